"""What an embedding cache was computed from, and a fingerprint of the image.

A cache is only reused when every field of its :class:`CacheSignature` equals the
request's; otherwise :meth:`CacheSignature.differences` says which fields differ, so the
caller can recompute or report.

The image fingerprint must see every change to the image, yet opening a plane of a
terabyte volume must not read the volume. So it folds in what is cheap and complete for
each kind of array (see :func:`fingerprint`): the listing of a Zarr store on disk (every
file under the array with its size and modification time, which a rewrite of any chunk
changes), the whole content of an in-memory array (hashing is faster than reading it
was), dask's own token, and in every case but the in-memory one a fixed sample of chunks
(corners, centre and an even spread) as a second line of defence.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from .sampling import chunk_shape, sample_regions

__all__ = ["CacheSignature", "as_stored", "describe_fingerprint", "fingerprint"]

_SAMPLED_CHUNKS = 16
# A sampled chunk is read up to this side: whole-plane chunks of 16k x 16k stay affordable.
_MAX_SIDE = 2048
# Zarr metadata files: a folder holding one is another node, not part of this array.
_NODE_FILES = ("zarr.json", ".zarray", ".zgroup")


def fingerprint(array, samples: int = _SAMPLED_CHUNKS) -> str:
    """A hash of an array's shape, dtype and chunking and of everything that says whether
    its content changed.

    What is folded in depends on the array:

    * a numpy array (an image read from TIFF, .npy, PNG is one): its whole content;
    * a Zarr array in a local store (v2, v3, OME-Zarr): the listing of the files under
      the array (name, size, modification time in ns), plus ``samples`` chunks;
      in a zip store: the zip file's size and mtime, plus the samples; in a memory store:
      every stored byte; in another store (remote): the samples only;
    * a numpy memory map: its file's size and mtime, plus the samples;
    * a dask array: ``dask.base.tokenize`` of it and the listing of every Zarr array in
      its graph, plus the samples;
    * anything else with ``shape``, ``dtype`` and slicing: the samples only.

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
        ``"<kind>:blake2b:<hex>"``, where the kind says what was folded in (read it with
        :func:`describe_fingerprint`), e.g. ``"listing6401+sample16:blake2b:..."``.
    """
    shape = tuple(int(s) for s in array.shape)
    chunk = chunk_shape(array)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps({"shape": shape, "dtype": str(np.dtype(array.dtype)), "chunks": chunk}).encode())
    kind = []
    if isinstance(array, np.ndarray) and not isinstance(array, np.memmap):  # a memory map would be read whole
        digest.update(b"whole" + _whole_hash(np.asarray(array)))
        kind.append("whole")
    else:
        if _is_dask(array):
            from dask.base import tokenize

            digest.update(b"dask" + tokenize(array).encode())
            kind.append("dask")
        for part, text in _backing(array):
            digest.update(text.encode())
            kind.append(part)
        n = 0
        for region in sample_regions(shape, chunk, samples, max_side=_MAX_SIDE):
            block = np.ascontiguousarray(np.asarray(array[region]))
            digest.update(repr(region).encode())
            digest.update(block.tobytes())
            n += 1
        kind.append(f"sample{n}")
    return "+".join(kind) + ":blake2b:" + digest.hexdigest()


def describe_fingerprint(value: str) -> str:
    """What a fingerprint from :func:`fingerprint` covers, in words.

    >>> describe_fingerprint("listing6401+sample16:blake2b:00")
    'store listing (6401 files: names, sizes, mtimes) + 16 sampled chunks'
    """
    parts = value.split(":")
    if len(parts) < 3:  # written before the kind was recorded: a sample only
        return "16 sampled chunks only (an older cache: changes outside them were missed)"
    words = []
    for token in parts[0].split("+"):
        number = re.sub(r"\D", "", token)
        name = token.rstrip("0123456789")
        words.append({
            "whole": "whole array hashed",
            "dask": "dask token",
            "listing": f"store listing ({number} files: names, sizes, mtimes)",
            "sizes": f"store listing ({number} files: names and sizes, no times)",
            "file": "file size and mtime",
            "memory": f"memory store contents ({number} keys)",
            "sample": f"{number} sampled chunks",
        }.get(name, token))
    if parts[0].split("+")[-1].startswith("sample") and len(words) == 1:
        words[0] += " only"
    return " + ".join(words)


def _whole_hash(array: np.ndarray) -> bytes:
    h = xxhash.xxh3_128()
    if array.flags.c_contiguous:
        h.update(array.reshape(-1).view(np.uint8).data)
    else:  # a strided view: one contiguous copy of a plane at a time bounds the memory
        for index in np.ndindex(array.shape[:-2]):
            h.update(np.ascontiguousarray(array[index]).reshape(-1).view(np.uint8).data)
    return h.digest()


def _is_dask(array) -> bool:
    return type(array).__module__.startswith("dask.") and hasattr(array, "__dask_graph__")


def _backing(array) -> list[tuple[str, str]]:
    """(kind, text) for each storage behind an array whose listing can be folded in."""
    if isinstance(array, np.memmap) and getattr(array, "filename", None):
        return [("file", _stat_text(Path(str(array.filename))))]
    if _is_dask(array):
        import zarr

        # Only materialised layers are looked at: from_zarr/from_array keep the source
        # array there, and expanding a blockwise layer would cost as much as the graph.
        graph = array.__dask_graph__()
        layers = getattr(graph, "layers", {"": graph})
        found: dict[int, Any] = {}
        for layer in layers.values():
            if type(layer).__name__ not in ("MaterializedLayer", "dict"):
                continue
            for value in layer.values():
                if isinstance(value, zarr.Array):
                    found.setdefault(id(value), value)
        return [item for z in found.values() for item in _backing(z)]
    store = getattr(array, "store", None)
    if store is None or not hasattr(array, "path"):
        return []
    from zarr.storage import FsspecStore, LocalStore, MemoryStore, WrapperStore, ZipStore

    while isinstance(store, WrapperStore):
        store = store._store
    if isinstance(store, LocalStore):
        folder = Path(store.root) / str(array.path)
        entries = _listing(folder)
        return [(f"listing{len(entries)}", "\n".join(entries))]
    if isinstance(store, FsspecStore):  # dask's from_zarr opens even local paths this way
        return _fsspec_listing(store, str(array.path))
    if isinstance(store, ZipStore):
        return [("file", _stat_text(Path(store.path)) + "\n" + str(array.path))]
    if isinstance(store, MemoryStore):
        prefix = str(array.path).strip("/")
        items = sorted((k, v) for k, v in store._store_dict.items() if not prefix or k.startswith(prefix + "/"))
        h = xxhash.xxh3_128()
        for key, buffer in items:
            h.update(key.encode())
            h.update(buffer.to_bytes())
        return [(f"memory{len(items)}", h.hexdigest())]
    return []


# What a remote listing may say about when (or as what) a file was written.
_VERSION_KEYS = ("mtime", "LastModified", "last_modified", "updated", "created", "ETag", "etag", "md5Hash")


def _fsspec_listing(store, path: str) -> list[tuple[str, str]]:
    fs = getattr(store.fs, "sync_fs", store.fs)
    root = "/".join(p for p in (str(store.path).rstrip("/"), path.strip("/")) if p)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        entries = _listing(Path(root))
        return [(f"listing{len(entries)}", "\n".join(entries))]
    try:
        if getattr(fs, "asynchronous", False):
            from fsspec.asyn import sync

            found = sync(fs.loop, fs._find, root, detail=True)
        else:
            found = fs.find(root, detail=True)
    except Exception:  # noqa: BLE001 - a store that cannot list (plain HTTP) is sampled only
        return []
    lines, dated = [], True
    for name, meta in sorted(found.items()):
        stamp = next((str(meta[k]) for k in _VERSION_KEYS if meta.get(k) is not None), None)
        dated = dated and stamp is not None
        lines.append(f"{name[len(root):]}\t{meta.get('size')}\t{stamp}")
    return [(f"{'listing' if dated else 'sizes'}{len(lines)}", "\n".join(lines))]


def _stat_text(path: Path) -> str:
    # The name is left out: a store moved or copied with its times kept is the same image.
    st = path.stat()
    return f"{st.st_size}\t{st.st_mtime_ns}"


def _listing(folder: Path) -> list[str]:
    """``"key\\tsize\\tmtime_ns"`` for every file under a Zarr array's folder, sorted.

    Folders that hold another Zarr node (a group or array nested inside the array's
    folder) and the temporary ``.partial`` files of a write in progress are skipped.
    """
    out = []
    pending = [(folder, "")]
    while pending:
        here, prefix = pending.pop()
        with os.scandir(here) as it:
            items = list(it)
        if prefix and any(e.name in _NODE_FILES for e in items):
            continue
        for e in items:
            if e.is_dir(follow_symlinks=True):
                pending.append((Path(e.path), prefix + e.name + "/"))
            elif not e.name.endswith(".partial"):
                st = e.stat()
                out.append(f"{prefix}{e.name}\t{st.st_size}\t{st.st_mtime_ns}")
    out.sort()
    return out


def as_stored(value):
    """``value`` (dicts, tuples, lists, numbers) as a signature stores and reads it back in
    JSON: tuples become lists, numpy scalars plain floats, so that a fresh signature
    compares equal to a stored one."""
    return json.loads(json.dumps(value, default=float))


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
        The channel embedded, for images with a channel axis (None: grayscale or RGB; a
        name such as ``"haematoxylin"``: see :mod:`napari_sam.core.stain`).
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
    channel: int | str | None = None
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
