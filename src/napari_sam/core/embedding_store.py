"""The embedding cache on disk: a Zarr v3 group of tile embeddings, one entry per tile.

Layout of a cache (a directory ending in ``.zarr``)::

    cache.zarr/                 group; attrs {"napari_sam": {"format": 2}}
      <key>/                    one group per signature; attrs {"signature": {...}}
        features                (planes, tile rows, tile cols, 256, 64, 64), one chunk per tile
        checksums               (planes, tile rows, tile cols) uint64, one chunk per tile

``<key>`` is a hash of the :class:`~napari_sam.core.signature.CacheSignature`, so
embeddings computed with another model, precision, tiling, normalisation or from other
image data live beside the old ones instead of replacing or, worse, passing for them.

An entry counts as present only when its checksum (xxh3-64 of the entries' key, the
entry's place and the feature bytes) is written and matches: features are written
first, the checksum last, and Zarr's local store writes each chunk to a temporary file
that it renames into place. An interrupted
run therefore leaves entries either complete or absent, and a file damaged later is
caught when it is read and computed again, and so is a tile copied (with its checksum)
from another image's cache or from another place. Groups written before the checksum
covered the key and the place (no ``checksum`` attribute) are read with the feature bytes'
hash alone. One chunk per entry also lets many processes
write one cache at once without touching each other's files.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash
import zarr

from . import cache_folder
from .cache_folder import signature_key
from .signature import CacheSignature

__all__ = ["CacheMismatchError", "EmbeddingStore", "FEATURE_SHAPE", "TileCheck", "describe_cache", "signature_key"]

FEATURE_SHAPE = (256, 64, 64)
_STORAGE = ("float32", "float16")
MARK_USED_EVERY = 600.0
"""Seconds between two marks of use (:func:`~napari_sam.core.cache_folder.mark_used`)
by a store that reads or writes tiles: a session left open for days while it works keeps
its cache "recently used", so that ``napari-sam caches --older-than`` leaves it."""


class CacheMismatchError(ValueError):
    """The cache holds embeddings, but none computed the way the request asks."""


# The group attribute that says its checksums cover the key and the entry's place.
_PLACED = "xxh3-64 of key, entry, bytes"


def _checksum(features: np.ndarray, place: bytes = b"") -> int:
    # 0 is the fill value that means "absent"; a real hash of 0 is nudged to 1.
    digest = xxhash.xxh3_64(place)
    digest.update(np.ascontiguousarray(features).tobytes())
    return digest.intdigest() or 1


@dataclass(frozen=True)
class TileCheck:
    """Every recorded tile read against its checksum (:meth:`EmbeddingStore.verify`):
    how many were ``checked``; (plane, tile row, tile col) of those ``damaged`` (features
    undecodable or not matching) and ``missing`` (checksum recorded, features chunk gone)."""

    checked: int
    damaged: list[tuple[int, int, int]]
    missing: list[tuple[int, int, int]]

    @property
    def clean(self) -> bool:
        """Whether every recorded entry was found intact."""
        return not self.damaged and not self.missing


class EmbeddingStore:
    """Tile embeddings of one image under one signature.

    Use :meth:`open`; entries are addressed as ``(plane, row, col)``: the flat plane
    number and the tile's position in the grid.
    """

    def __init__(self, group: zarr.Group, signature: CacheSignature, path: str | None):
        self.group = group
        self.signature = signature
        self.path = path
        self.features = cache_folder.member_array(group, "features")
        self.checksums = cache_folder.member_array(group, "checksums")
        self._placed = group.attrs.get("checksum") == _PLACED
        self._writable = path is not None and not getattr(group.store, "read_only", True)
        self._marked = time.monotonic()  # the opening for work marked it (cache_folder.open_root)

    @property
    def key(self) -> str:
        """The signature's group name inside the cache."""
        return signature_key(self.signature)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one embedding."""
        c, h, w = self.features.shape[3:]
        return int(c), int(h), int(w)

    @property
    def layout(self) -> tuple[int, int, int]:
        """(planes, tile rows, tile columns)."""
        p, r, c = self.checksums.shape
        return int(p), int(r), int(c)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike | None,
        signature: CacheSignature,
        layout: tuple[int, int, int],
        on_mismatch: str = "keep",
        feature_shape: tuple[int, int, int] = FEATURE_SHAPE,
    ) -> "EmbeddingStore":
        """Open (or create) the entries for ``signature`` in the cache at ``path``.

        Parameters
        ----------
        path
            The cache directory (created if missing), or None for a cache in memory.
        signature
            What the embeddings are computed from.
        layout
            (planes, tile rows, tile columns) of the image.
        feature_shape
            (channels, height, width) of one embedding: (256, 64, 64) for SAM's 1024-pixel
            input, smaller for models with a smaller input.
        on_mismatch
            What to do when the cache holds embeddings of other signatures only (of the same
            ``feature_shape``; other kinds are left alone):
            ``"keep"`` (default) adds the new ones beside them and warns with the fields
            that differ; ``"beside"`` adds them silently (the same image at another
            magnification); ``"error"`` raises :class:`CacheMismatchError` saying what
            differs; ``"replace"`` deletes the others.

        Raises
        ------
        CacheMismatchError
            With ``on_mismatch="error"``, naming the differing fields.
        ValueError
            For a path that is not an embedding cache, or a bad argument.
        """
        if on_mismatch not in ("keep", "beside", "error", "replace"):
            raise ValueError(f"on_mismatch must be 'keep', 'beside', 'error' or 'replace', not {on_mismatch!r}")
        if signature.storage not in _STORAGE:
            raise ValueError(f"storage dtype must be one of {_STORAGE}, not {signature.storage!r}")
        root = cache_folder.open_root(path, "a")
        key = signature_key(signature)
        existing = cache_folder.signatures(root)
        if key not in existing:
            # entries of another kind (SAM 2's features beside SAM's embeddings) are neither near misses nor replaced
            others = {k: s for k, s in existing.items()
                      if k != key and cache_folder.kind(root, k) == tuple(feature_shape)}
            if others:
                closest = min(others.values(), key=lambda s: len(s.differences(signature)))
                diffs = "; ".join(closest.differences(signature))
                if on_mismatch == "error":
                    raise CacheMismatchError(
                        f"the embedding cache {path} was computed differently ({diffs}); "
                        "recompute into it with on_mismatch='keep' (--on-mismatch keep: keeps the old entries) or "
                        "'replace' (--on-mismatch replace)"
                    )
                # another channel of the same image is another view, as wanted, not a near miss
                # (whose intensity limits are its own)
                fields = {d.split(":")[0] for d in closest.differences(signature)}
                another_channel = "channel" in fields and fields <= {"channel", "normalization"}
                if on_mismatch == "keep" and not another_channel:
                    warnings.warn(
                        f"the embedding cache {path} holds embeddings computed differently ({diffs}); "
                        "they are kept and new ones are computed beside them (on_mismatch='replace', "
                        "--on-mismatch replace: drop them)",
                        stacklevel=3,
                    )
                elif on_mismatch == "replace":
                    for k in others:
                        cache_folder.delete_group(root, k, path)
            # a crashed creation (or damage) left a group without its signature
            if key in cache_folder.entry_keys(root):
                cache_folder.delete_group(root, key, path)
            group = root.create_group(key)
            P, R, C = layout
            group.create_array(
                "features",
                shape=(P, R, C, *feature_shape),
                chunks=(1, 1, 1, *feature_shape),
                dtype=signature.storage,
                fill_value=0,
            )
            group.create_array("checksums", shape=(P, R, C), chunks=(1, 1, 1), dtype="uint64", fill_value=0)
            group.attrs["checksum"] = _PLACED
            # The signature goes last: a group is only recognised once it is complete.
            group.attrs["signature"] = signature.to_json()
        group = cache_folder.member_group(root, key)
        store = cls(group, signature, None if path is None else str(path))
        if store.layout != tuple(layout) or store.feature_shape != tuple(feature_shape):
            raise ValueError(
                f"cache entries have layout {store.layout} and features {store.feature_shape}, "
                f"expected {tuple(layout)} and {tuple(feature_shape)}"
            )
        return store

    @classmethod
    def attach(cls, path: str | os.PathLike, key: str) -> "EmbeddingStore":
        """Open existing entries by their key (in a worker process, say); never creates."""
        root = cache_folder.open_root(path, "r+")
        signatures = cache_folder.signatures(root)
        if key not in signatures:
            raise ValueError(f"the embedding cache {path} has no entries {key!r}")
        return cls(cache_folder.member_group(root, key), signatures[key], str(path))

    # -- entries -----------------------------------------------------------------------
    def write(self, entry: tuple[int, int, int], features) -> None:
        """Store a (256, 64, 64) (or (1, 256, 64, 64)) embedding; the checksum goes last."""
        data = np.asarray(features, dtype=np.float32).reshape(self.feature_shape).astype(
            self.signature.storage, copy=False
        )
        p, r, c = entry
        self.features[p, r, c] = data
        self.checksums[p, r, c] = np.uint64(self._checksum(entry, data))
        self.note_use()

    def read(self, entry: tuple[int, int, int]) -> np.ndarray | None:
        """The (256, 64, 64) float32 embedding, or None when absent or damaged (a damaged
        entry is forgotten, so that it is computed again)."""
        p, r, c = entry
        # Zarr types an element read as any scalar or array; here it is one uint64.
        try:
            expected = int(np.asarray(self.checksums[p, r, c]))
        except Exception:  # noqa: BLE001 - an undecodable checksum chunk: the entry counts as absent
            return None
        if expected == 0:
            return None
        try:
            data = np.asarray(self.features[p, r, c])
        except Exception:  # noqa: BLE001 - any decoding failure means a damaged chunk
            data = None
        if data is None or self._checksum(entry, data) != expected:
            self.forget(entry)
            return None
        self.note_use()
        return data.astype(np.float32, copy=False)

    def note_use(self) -> None:
        """Mark the cache used (:func:`~napari_sam.core.cache_folder.mark_used`) when the
        last mark is :data:`MARK_USED_EVERY` seconds old. Reads and writes call it; so do
        sessions that answer from tiles they hold in memory. Only a store opened for work
        marks: a read-only look (``napari-sam info``) is not a use."""
        if self._writable and self.path is not None and time.monotonic() - self._marked >= MARK_USED_EVERY:
            self._marked = time.monotonic()
            cache_folder.mark_used(self.path)

    def _checksum(self, entry: tuple[int, int, int], data: np.ndarray) -> int:
        # The key and the place make a tile copied from another image's cache, or from
        # another tile, fail its check instead of answering for this one.
        if not self._placed:
            return _checksum(data)
        return _checksum(data, f"{self.key}/{entry[0]}/{entry[1]}/{entry[2]}/".encode())

    def forget(self, entry: tuple[int, int, int]) -> None:
        """Mark an entry absent."""
        p, r, c = entry
        self.checksums[p, r, c] = np.uint64(0)

    def removed(self) -> bool:
        """Whether the entries' folder was deleted under this store (a cache cleaned during a
        session): writing on would leave chunks without their metadata, a folder that no
        later session can open."""
        return self.path is not None and not (Path(self.path).expanduser() / self.key / "zarr.json").is_file()

    def stored(self, entry: tuple[int, int, int]) -> bool:
        """Whether an entry's checksum is written (not verified); an undecodable checksum
        chunk counts as absent, so that the entry is computed again."""
        try:
            return int(np.asarray(self.checksums[entry])) != 0
        except Exception:  # noqa: BLE001 - any decoding failure means a damaged chunk
            return False

    def plane_stored(self, plane: int) -> bool:
        """Whether every entry of a (flat) plane has its checksum written (see :meth:`stored`)."""
        try:
            return bool((np.asarray(self.checksums[plane]) != 0).all())
        except Exception:  # noqa: BLE001 - any decoding failure means a damaged chunk
            return False

    def present(self) -> np.ndarray:
        """(planes, rows, cols) bool: entries whose checksum is written (not verified)."""
        return self._checksums()[0] != 0

    def verify(self) -> TileCheck:
        """Read every entry whose checksum is recorded and compare; changes nothing.

        Unlike :meth:`read`, a damaged entry is reported, not forgotten, so that a cache
        can be checked while it is read only (``napari-sam info --verify``).
        """
        checks, unreadable = self._checksums()
        damaged, missing = list(unreadable), []
        for index in zip(*np.nonzero(checks)):
            entry = (int(index[0]), int(index[1]), int(index[2]))
            if not self._has_features(entry):
                missing.append(entry)
                continue
            try:
                data = np.asarray(self.features[entry])
            except Exception:  # noqa: BLE001 - any decoding failure means a damaged chunk
                damaged.append(entry)
                continue
            if self._checksum(entry, data) != int(checks[entry]):
                damaged.append(entry)
        return TileCheck(int((checks != 0).sum()) + len(unreadable), damaged, missing)

    def _checksums(self) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """Every entry's recorded checksum (0: absent), and the entries whose checksum chunk
        cannot be decoded (read as absent: computed again, which rewrites the chunk)."""
        try:
            return np.asarray(self.checksums[...]), []
        except Exception:  # noqa: BLE001 - one damaged chunk: read them one by one
            pass
        checks = np.zeros(self.checksums.shape, np.uint64)
        damaged: list[tuple[int, int, int]] = []
        for p, r, c in np.ndindex(*checks.shape):
            try:
                checks[p, r, c] = np.asarray(self.checksums[p, r, c])
            except Exception:  # noqa: BLE001 - any decoding failure means a damaged chunk
                damaged.append((int(p), int(r), int(c)))
        return checks, damaged

    def _has_features(self, entry: tuple[int, int, int]) -> bool:
        """Whether the entry's features chunk exists (Zarr reads an absent one as zeros)."""
        if self.path is None:
            return True  # in memory: an absent chunk reads as zeros and fails its checksum
        key = self.features.metadata.encode_chunk_key((*entry, 0, 0, 0))
        return (Path(self.path).expanduser() / self.key / "features" / key).is_file()

    def missing(self, entries, verify: bool = False) -> list[tuple[int, int, int]]:
        """The entries, among those given, that need computing. ``verify`` also reads
        the present ones and checks their checksums (catches damaged files)."""
        present = self.present()
        out = []
        for e in entries:
            if not present[e] or (verify and self.read(e) is None):
                out.append(tuple(e))
        return out


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe_cache(path: str | os.PathLike, verify: bool = False) -> list[dict]:
    """What a cache holds: one dict per signature.

    Parameters
    ----------
    path
        The cache folder.
    verify
        Also read every present entry against its checksum (slow: all the tiles are
        read); the result is under ``"check"`` (a :class:`TileCheck`), else None.

    Returns
    -------
    list of dict
        ``key``, ``signature`` (its fields), ``layout``, ``present`` (entries whose
        checksum is recorded: counted, not read), ``total``, ``bytes`` on disk, ``check``.
    """
    path = Path(path).expanduser()
    root = cache_folder.open_root(path, "r")
    out = []
    for key, sig in sorted(cache_folder.signatures(root).items()):
        store = EmbeddingStore(cache_folder.member_group(root, key), sig, str(path))
        checks = store.present()
        out.append(
            {
                "key": key,
                "signature": sig.to_json(),
                "layout": list(checks.shape),
                "present": int(checks.sum()),
                "total": int(checks.size),
                "bytes": _disk_bytes(path / key),
                "check": store.verify() if verify else None,
            }
        )
    return out
