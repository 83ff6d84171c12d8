"""The resolution pyramid of a label image: one sampling rule, for building and for keeping
it current.

A lower level of a label pyramid must hold ids, never blends of them: averaging 3 and 5
would invent object 4. Each pixel of level ``k`` therefore takes the value of one level-0
pixel, the one under its centre. Along an axis where level ``k`` is ``f`` times coarser
than level 0 (``f`` = the ratio of their scales), index ``j`` covers level-0 coordinates
``[j f, (j + 1) f)`` and takes the level-0 value at

    floor((j + 0.5) * f), clipped to the last level-0 index.

This agrees with the half-pixel translation that OME-Zarr writers put on lower levels
(pixel centres stay aligned). :func:`source_indices` is that rule; :func:`downsample`
(building a level from level 0) and :func:`update_levels` (refreshing the pixels whose
source changed) both use it, so an update gives exactly what a rebuild would.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["affected_range", "downsample", "level_factors", "source_indices", "update_levels"]


def source_indices(size0: int, size: int, factor: float) -> np.ndarray:
    """For every index of a lower level along one axis, the level-0 index it copies.

    Parameters
    ----------
    size0
        Length of the axis at level 0.
    size
        Length of the axis at the lower level.
    factor
        How many level-0 pixels one lower-level pixel spans (level-k scale / level-0 scale).

    Returns
    -------
    numpy.ndarray
        (size,) int64, non-decreasing, each in ``0 .. size0 - 1``.
    """
    j = np.arange(size, dtype=np.float64)
    return np.minimum(np.floor((j + 0.5) * factor).astype(np.int64), size0 - 1)


def level_factors(shapes: Sequence[Sequence[int]], scales: Sequence[Sequence[float] | None]) -> list[tuple[float, ...]]:
    """Per level and axis, how many level-0 pixels one pixel spans.

    Parameters
    ----------
    shapes
        The shape of every level, level 0 first.
    scales
        Every level's scale per axis (from its ``coordinateTransformations``), or None
        where a level declares none.

    Returns
    -------
    list of tuple of float
        Level-k scale / level-0 scale per axis; where a scale is missing or zero, or
        disagrees with the shapes by more than a level-k pixel, the shape ratio (level-0
        size / level-k size) stands in. Rounded to 9 decimals, so that
        a ratio such as 0.3 / 0.1 reads 3, not 2.9999999999999996.
    """
    base = scales[0]
    out = []
    for shape, scale in zip(shapes, scales):
        factors = []
        for axis, (n0, n) in enumerate(zip(shapes[0], shape)):
            f = n0 / n if n else 1.0
            if scale is not None and base is not None and base[axis] and scale[axis]:
                declared = float(scale[axis]) / float(base[axis])
                # A declared scale that the shapes contradict (every level at scale 1, say)
                # would make a lower level a crop of level 0: the shapes are believed then.
                if abs(n * declared - n0) <= max(declared, 1.0):
                    f = declared
            factors.append(round(f, 9))
        out.append(tuple(factors))
    return out


def downsample(level0: np.ndarray, shape: Sequence[int], factors: Sequence[float]) -> np.ndarray:
    """A lower level of ``shape`` built from the whole of level 0 by the sampling rule."""
    index = np.ix_(*(source_indices(n0, n, f) for n0, n, f in zip(level0.shape, shape, factors)))
    return np.asarray(level0)[index]


def affected_range(lo: int, hi: int, size0: int, size: int, factor: float) -> tuple[int, int]:
    """The lower-level indices ``[j0, j1)`` along one axis whose source lies in the level-0
    range ``[lo, hi)``; empty (j0 == j1) when none samples it."""
    src = source_indices(size0, size, factor)
    return int(np.searchsorted(src, lo, "left")), int(np.searchsorted(src, hi, "left"))


def update_levels(levels: Sequence, factors: Sequence[Sequence[float]], plane: tuple[int, ...],
                  region: tuple[int, int, int, int]) -> None:
    """Refresh the lower levels after level 0 changed in ``plane + (y0:y1, x0:x1)``.

    Only the lower-level pixels that sample the changed region are written, so only their
    chunks are touched; a lower level whose planes skip ``plane`` (Z downsampled) is left
    alone.

    Parameters
    ----------
    levels
        The arrays of the pyramid, level 0 first (numpy or zarr; written in place).
    factors
        :func:`level_factors` of the pyramid.
    plane
        Index over the leading axes of level 0 (``()`` for a 2D image).
    region
        ``(y0, y1, x0, x1)`` of level 0's plane that changed.
    """
    base = levels[0]
    shape0 = tuple(base.shape)
    lead = len(shape0) - 2
    if len(plane) != lead:
        raise ValueError(f"a plane of labels of shape {shape0} has {lead} index(es), got {plane}")
    y0, y1, x0, x1 = region
    block = None  # the changed box of level 0, read once: every lower level samples inside it
    for level, f in zip(levels[1:], factors[1:]):
        shape = tuple(level.shape)
        spans = [affected_range(p, p + 1, n0, n, a) for p, n0, n, a in zip(plane, shape0, shape, f)]
        spans += [affected_range(y0, y1, shape0[-2], shape[-2], f[-2]),
                  affected_range(x0, x1, shape0[-1], shape[-1], f[-1])]
        if any(a >= b for a, b in spans):
            continue
        (j0, j1), (i0, i1) = spans[-2:]
        rows = source_indices(shape0[-2], shape[-2], f[-2])[j0:j1]
        cols = source_indices(shape0[-1], shape[-1], f[-1])[i0:i1]
        if block is None:
            block = np.asarray(base[plane + (slice(y0, y1), slice(x0, x1))])
        values = block[np.ix_(rows - y0, cols - x0)]
        target = tuple(slice(a, b) for a, b in spans)
        level[target] = np.broadcast_to(values, tuple(b - a for a, b in spans))
