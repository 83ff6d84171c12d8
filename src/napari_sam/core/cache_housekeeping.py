"""The embedding caches of the user cache folder: listed, and the least recently used removed.

Images that are not Zarr stores beside a writable folder (TIFFs, arrays in a session, a
numpy array edited between sessions) get their cache in
``<user cache>/embeddings/<fingerprint>.zarr`` (:mod:`napari_sam.core.cache_location`).
Nothing there is ever removed by itself, and each changed image makes a new cache, so the
folder grows by a few hundred MB per image. :func:`user_caches` lists it; :func:`remove`
frees it by age or down to a size, least recently used first.

"Last used" is the modification time of a cache's root ``zarr.json``, which every opening
for work touches (:func:`napari_sam.core.cache_folder.open_root`), and so does a store
reading or writing tiles, at most every ten minutes
(:data:`napari_sam.core.embedding_store.MARK_USED_EVERY`): a cache read for months
without a new tile still counts as used, and so does the cache of a napari session left
open for days while it works.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import cache_folder
from .claims import TileClaims, cache_lock, claims_folder

__all__ = ["CacheSummary", "remove", "user_cache_folder", "user_caches"]

_REMOVING = ".removing-"  # a cache being removed is first renamed so, out of every listing


@dataclass(frozen=True)
class CacheSummary:
    """One embedding cache of the user cache folder.

    ``bytes`` on disk; ``last_used`` seconds since the epoch; ``entries`` one line per
    signature group (model, image shape and axes); ``busy``: a writer still at work holds
    claims in it (an ``embed`` or a session embedding ahead), so it is never removed; the
    claims of writers that are gone do not count.
    """

    path: Path
    bytes: int
    last_used: float
    entries: list[str] = field(default_factory=list)
    busy: bool = False


def user_cache_folder() -> Path:
    """``<user cache>/embeddings``: where caches go that have no Zarr image to sit beside."""
    from ..weights import cache_dir

    return cache_dir() / "embeddings"


def user_caches(folder: str | os.PathLike | None = None) -> list[CacheSummary]:
    """The embedding caches of a folder, least recently used first.

    Parameters
    ----------
    folder
        Default :func:`user_cache_folder`.

    Returns
    -------
    list of CacheSummary
        Folders that are not embedding caches are not listed (and so never removed);
        leftovers of an interrupted removal are cleared on the way.
    """
    root = Path(folder).expanduser() if folder is not None else user_cache_folder()
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(_REMOVING):
            shutil.rmtree(path, ignore_errors=True)
            continue
        if path.is_dir() and not path.name.startswith(".") and (summary := _summary(path)) is not None:
            out.append(summary)
    return sorted(out, key=lambda c: c.last_used)


def _summary(path: Path) -> CacheSummary | None:
    """The summary of one cache folder; None for a folder that is not an embedding cache."""
    try:
        last_used = (path / "zarr.json").stat().st_mtime
        group = cache_folder.open_root(path, "r")
        signatures = cache_folder.signatures(group)
        keys = cache_folder.entry_keys(group)
    except (OSError, ValueError):
        return None
    entries = [f"{s.model}, {'x'.join(map(str, s.shape))} {s.axes}" for s in signatures.values()]
    busy = any(TileClaims(claims_folder(path, key)).live() for key in keys)
    return CacheSummary(path, _size(path), last_used, entries, busy)


def remove(caches: list[CacheSummary], *, older_than_days: float | None = None, max_bytes: int | None = None,
           dry_run: bool = False, now: float | None = None) -> list[CacheSummary]:
    """Remove caches unused for ``older_than_days``, then the least recently used until
    the rest hold at most ``max_bytes``; busy caches are kept whatever their age.

    Parameters
    ----------
    caches
        As :func:`user_caches` lists them.
    older_than_days, max_bytes
        Either or both; with neither, nothing is removed.
    dry_run
        Only say what would go.
    now
        The time to measure ages from (seconds since the epoch; default now).

    Returns
    -------
    list of CacheSummary
        The caches removed (or that would be), least recently used first.
    """
    now = time.time() if now is None else now
    chosen: list[CacheSummary] = []
    kept = sorted(caches, key=lambda c: c.last_used)
    if older_than_days is not None:
        cutoff = now - older_than_days * 86400
        chosen = [c for c in kept if c.last_used < cutoff and not c.busy]
        kept = [c for c in kept if c not in chosen]
    if max_bytes is not None:
        total = sum(c.bytes for c in kept)
        for c in list(kept):
            if total <= max_bytes:
                break
            if not c.busy:
                chosen.append(c)
                kept.remove(c)
                total -= c.bytes
    if not dry_run:
        chosen = [c for c in chosen if _remove_one(c)]
    return sorted(chosen, key=lambda c: c.last_used)


def _remove_one(cache: CacheSummary) -> bool:
    """Remove a cache unless it was opened or claimed since it was listed; whether it went."""
    path = cache.path
    if not path.is_dir():  # gone already (the lock would make the folder again)
        return False
    # Under the cache's lock, which every opening takes: renamed first, so a half-removed
    # cache is never read as one, and a session opening it next finds none and makes one.
    with cache_lock(path):
        again = _summary(path)
        if again is None or again.busy or again.last_used != cache.last_used:
            return False
        gone = path.with_name(f"{_REMOVING}{uuid.uuid4().hex[:8]}-{path.name}")
        try:
            path.rename(gone)
        except OSError:
            return False
    shutil.rmtree(gone, ignore_errors=True)
    return True


def _size(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total
