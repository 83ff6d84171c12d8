"""Computing an image's missing embeddings ahead of the clicks, with progress.

:meth:`Embeddings.precompute <napari_sam.core.embeddings.Embeddings.precompute>` and
:meth:`~napari_sam.core.embeddings.Embeddings.compute_all` run here: the tiles not yet in
the cache are computed one after another (torch uses the cores) or on a
``dask.distributed`` cluster, shared with any other writer of the same cache through
claims (:mod:`~napari_sam.core.claims`), one progress report per finished tile.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

from .claims import CLAIM_TIMEOUT, TileClaims, claims_folder
from .distributed import run_distributed
from .shared_work import share_work

__all__ = ["EmbedProgress", "compute_all", "iter_precompute"]


@dataclass(frozen=True)
class EmbedProgress:
    """Progress of :meth:`Embeddings.precompute <napari_sam.core.embeddings.Embeddings.precompute>`.

    Attributes
    ----------
    done, total
        Entries (tiles) present in the cache, out of those asked for.
    entry
        (plane, tile row, tile column) just finished; None for the first report (what
        was cached before the run).
    """

    done: int
    total: int
    entry: tuple[int, int, int] | None


def iter_precompute(embeddings, planes=None, scheduler=None, verify: bool = True,
                    claim_timeout: float = CLAIM_TIMEOUT) -> Iterator[EmbedProgress]:
    """Compute every missing tile of ``embeddings``' given planes; yields progress.

    The parameters and reports are those of :meth:`Embeddings.precompute
    <napari_sam.core.embeddings.Embeddings.precompute>`, which documents them.
    """
    entries = embeddings.entries(planes)
    todo = embeddings.store.missing(entries, verify=verify)
    done = len(entries) - len(todo)
    yield EmbedProgress(done, len(entries), None)
    # Other writers of this cache (another `embed`) may be computing some of the same
    # tiles: each is claimed before it is computed (a cache in memory has no others).
    # (a cache that refused a tile was left for a store in memory: its path is None)
    claims = None if embeddings.store.path is None else TileClaims(
        claims_folder(embeddings.store.path, embeddings.store.key), claim_timeout)
    first = None if scheduler is None else functools.partial(run_distributed, embeddings, scheduler=scheduler)
    # Closed explicitly: an error here must not leave claims held by a live process.
    with contextlib.closing(share_work(todo, claims, embeddings.entry_stored, first)) as work:
        for entry, computing in work:
            if computing:
                embeddings.embedding_for(entry[0], entry[1:])
            done += 1
            yield EmbedProgress(done, len(entries), entry)


def compute_all(embeddings, planes=None, scheduler=None, progress: bool = True) -> int:
    """:func:`iter_precompute` to the end with a tqdm progress bar; returns the number of
    tiles present afterwards."""
    from .progress_bar import progress_bar

    gen = iter_precompute(embeddings, planes, scheduler)
    last = next(gen)
    with progress_bar(total=last.total, initial=last.done, unit="tile", desc="embedding", progress=progress) as bar:
        for last in gen:  # noqa: B007 - the last report is returned after the loop
            bar.update(1)
    return last.done
