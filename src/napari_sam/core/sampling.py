"""A fixed, spread-out sample of an array's chunks.

Cache fingerprints and volume-wide intensity statistics both need to look at an image
without reading all of it: a Zarr or dask volume can be far larger than memory. Both read
the same kind of sample: the first and last chunk, the centre one and an even spread
between them, each cut to at most ``max_side`` pixels per spatial axis so that one huge
chunk (a whole 16k x 16k plane, say) does not blow the memory budget.
"""

from __future__ import annotations

import numpy as np

__all__ = ["chunk_shape", "sample_regions"]

VIRTUAL_CHUNK = 512


def chunk_shape(array) -> tuple[int, ...]:
    """The chunk shape of a zarr or dask array; virtual chunks for in-memory arrays.

    In-memory arrays get one ``VIRTUAL_CHUNK``-sided block of one plane, so that a large
    numpy volume is sampled too, not read whole.
    """
    chunks = getattr(array, "chunks", None)
    if chunks is None:
        shape = tuple(array.shape)
        return tuple(1 for _ in shape[:-2]) + tuple(min(s, VIRTUAL_CHUNK) for s in shape[-2:])
    if chunks and isinstance(chunks[0], tuple):  # dask: a tuple of block sizes per axis
        return tuple(int(c[0]) if c else 0 for c in chunks)
    return tuple(int(c) for c in chunks)


def sample_regions(
    shape: tuple[int, ...], chunks: tuple[int, ...], samples: int, max_side: int | None = None
) -> list[tuple[slice, ...]]:
    """Regions (one per sampled chunk, in a fixed order) to read from an array.

    Parameters
    ----------
    shape, chunks
        Array and chunk shape.
    samples
        How many chunks at most; the first, the last and the centre one are always among
        them.
    max_side
        Cut each region to at most this many elements along the last two axes (the
        chunk's centre part). None reads whole chunks.

    Returns
    -------
    list of tuple of slice
        Empty for an empty array.
    """
    if 0 in shape:
        return []
    grid = [max(1, -(-s // max(c, 1))) for s, c in zip(shape, chunks)]
    total = int(np.prod(grid))
    spread = np.linspace(0, total - 1, min(samples, total)).astype(int).tolist()
    picks = sorted({0, total - 1, total // 2, *spread})[: max(samples, 3)]
    regions = []
    for flat in picks:
        idx = np.unravel_index(flat, grid)
        region = []
        for axis, (i, c, s) in enumerate(zip(idx, chunks, shape)):
            start, stop = i * c, min((i + 1) * c, s)
            if max_side is not None and axis >= len(shape) - 2 and stop - start > max_side:
                start += (stop - start - max_side) // 2
                stop = start + max_side
            region.append(slice(int(start), int(stop)))
        regions.append(tuple(region))
    return regions
