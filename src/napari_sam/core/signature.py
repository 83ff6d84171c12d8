"""What an embedding cache was computed from, and a cheap fingerprint of the image.

A cache is only reused when every field of its :class:`CacheSignature` equals the
request's; otherwise :meth:`CacheSignature.differences` says which fields differ, so the
caller can recompute or report. The image fingerprint never reads the whole image: it
hashes the shape, dtype and chunking with a fixed sample of chunks (corners, centre and
an even spread), which for a Zarr or dask volume means reading a few chunks, not the
volume (hashing everything would load a terabyte to check a cache).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from .sampling import chunk_shape, sample_regions

__all__ = ["CacheSignature", "fingerprint"]

_SAMPLED_CHUNKS = 16
# A sampled chunk is read up to this side: whole-plane chunks of 16k x 16k stay affordable.
_MAX_SIDE = 2048


def fingerprint(array, samples: int = _SAMPLED_CHUNKS) -> str:
    """A hash of an array's shape, dtype, chunking and a fixed sample of its chunks.

    Parameters
    ----------
    array
        numpy, dask or zarr array (anything with ``shape``, ``dtype`` and slicing).
    samples
        How many chunks to read at most (the first, the last, the centre and an even
        spread between them).

    Returns
    -------
    str
        ``"blake2b:<hex>"``. Equal arrays give equal fingerprints; a change inside a
        sampled chunk, or to the shape, dtype or chunking, changes it.
    """
    shape = tuple(int(s) for s in array.shape)
    chunk = chunk_shape(array)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps({"shape": shape, "dtype": str(np.dtype(array.dtype)), "chunks": chunk}).encode())
    for region in sample_regions(shape, chunk, samples, max_side=_MAX_SIDE):
        block = np.ascontiguousarray(np.asarray(array[region]))
        digest.update(repr(region).encode())
        digest.update(block.tobytes())
    return "blake2b:" + digest.hexdigest()


@dataclass(frozen=True)
class CacheSignature:
    """Everything an embedding depends on.

    Attributes
    ----------
    model, checkpoint
        Model name and checkpoint checksum (``ModelSource.name``, ``ModelSource.checksum``).
    dtype
        Encoder precision name.
    normalization
        Intensity normalisation settings, as a JSON-able dict (``dataclasses.asdict`` of a
        :class:`~napari_sam.core.preprocess.Normalization`, plus limits if fixed).
    tile, halo
        Tiling of each plane (0 tile: untiled).
    shape, dtype_in, axes
        The image: shape, dtype name and axis names (e.g. ``"ZYX"``).
    image_fingerprint
        :func:`fingerprint` of the image.
    channel
        The channel embedded, for images with a channel axis (None: grayscale or RGB).
    storage
        dtype name of the stored features (``"float32"``, or ``"float16"`` to halve the
        cache at a relative precision of about 1e-3).
    """

    model: str
    checkpoint: str
    dtype: str
    normalization: dict
    tile: int
    halo: int
    shape: tuple[int, ...]
    dtype_in: str
    axes: str
    image_fingerprint: str
    channel: int | None = None
    storage: str = "float32"

    def to_json(self) -> dict:
        """Plain JSON-able form (for Zarr attributes)."""
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "CacheSignature":
        """Inverse of :meth:`to_json`; unknown or missing fields raise ValueError."""
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(
                f"not an embedding cache signature: missing {sorted(names - set(data))}, "
                f"unexpected {sorted(set(data) - names)}"
            )
        data = dict(data)
        data["shape"] = tuple(int(s) for s in data["shape"])
        return cls(**data)

    def differences(self, other: "CacheSignature") -> list[str]:
        """Human-readable list of the fields that differ: ``"tile: 1024 (cache) vs 512 (request)"``."""
        out = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                out.append(f"{f.name}: {a!r} (cache) vs {b!r} (request)")
        return out
