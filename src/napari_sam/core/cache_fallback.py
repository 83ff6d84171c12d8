"""What an interactive session does when its embedding cache fails it, so that clicking
goes on: a cache deleted under it is made anew, and one that cannot take entries (a folder
made read-only, a full disk, a spent quota) gives way to a store in memory, with one
warning. ``napari-sam embed``, whose work is to fill the cache, stops instead (its claims
are files in the cache)."""

from __future__ import annotations

import errno
import os
import warnings

from .claims import cache_lock
from .embedding_store import FEATURE_SHAPE, EmbeddingStore
from .signature import CacheSignature

__all__ = ["UNWRITABLE", "open_for_session", "write_kept"]

UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
"""What a cache that cannot take more entries reports."""


def open_for_session(path: str | os.PathLike | None, signature: CacheSignature, layout: tuple[int, int, int],
                     on_mismatch: str = "keep", feature_shape: tuple[int, int, int] = FEATURE_SHAPE) -> EmbeddingStore:
    """:meth:`EmbeddingStore.open <napari_sam.core.embedding_store.EmbeddingStore.open>`
    under the cache's lock (another process may be creating the same entries); a cache
    that cannot be written (a read-only folder without these entries yet, a full disk)
    gives a store in memory, with a warning."""
    try:
        with cache_lock(path):
            return EmbeddingStore.open(path, signature, layout, on_mismatch, feature_shape)
    except OSError as err:
        if path is None or err.errno not in UNWRITABLE:
            raise
        warnings.warn(f"the embedding cache {path} cannot be written ({err.strerror}): embeddings are kept in "
                      "memory only, for this session", stacklevel=3)
    return EmbeddingStore.open(None, signature, layout, feature_shape=feature_shape)


def write_kept(store: EmbeddingStore, entry: tuple[int, int, int], features) -> EmbeddingStore:
    """``store.write(entry, features)`` for a session that must go on; returns the store to
    go on with (the caller keeps it in place of ``store``).

    A cache deleted since it was opened is made anew (writing on would leave chunks without
    metadata, a folder no later session opens). A cache that refuses the write gives way,
    with one warning, to a store in memory that holds this entry and every later one, as
    without a cache.
    """
    if store.removed():
        with cache_lock(store.path):
            store = EmbeddingStore.open(store.path, store.signature, store.layout, "beside", store.feature_shape)
    try:
        store.write(entry, features)
        return store
    except OSError as err:
        if err.errno not in UNWRITABLE:
            raise
        warnings.warn(f"the embedding cache {store.path} cannot be written ({err.strerror}): tiles computed now are "
                      "kept in memory only, for this session", stacklevel=4)
    memory = EmbeddingStore.open(None, store.signature, store.layout, feature_shape=store.feature_shape)
    memory.write(entry, features)
    return memory
