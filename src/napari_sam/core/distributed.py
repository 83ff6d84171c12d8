"""Embedding tiles on a ``dask.distributed`` cluster (or local worker processes).

Each task embeds one tile and writes it straight into the on-disk cache, so nothing but
small job descriptions and tile indices travel back. Workers load the model from its
checkpoint file once and keep it; Zarr-backed images are read by the workers themselves,
other arrays are read here and sent a few tiles at a time, so memory stays bounded.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from .embedding_store import EmbeddingStore
from .image_source import ImageSource
from .models import load_model
from .predictor import Predictor
from .preprocess import Normalization

__all__ = ["embed_region", "run_distributed"]


def embed_region(predictor: Predictor, region: np.ndarray, limits) -> np.ndarray:
    """(256, 64, 64) float32 features (for a 1024-pixel model) of one tile's pixels."""
    emb = predictor.embed_image(region, limits=limits)
    return emb.features[0].float().cpu().numpy()


@dataclass(frozen=True)
class _Job:
    """Everything a worker process needs to embed one tile (small and picklable)."""

    checkpoint: str
    checksum: str
    dtype: str
    normalization: Normalization
    threads: int
    cache: str
    key: str
    entry: tuple[int, int, int]
    outer: tuple[int, int, int, int]
    limits: tuple[float, float] | None


@functools.lru_cache(maxsize=2)
def _worker_predictor(checkpoint: str, checksum: str, dtype: str, normalization: Normalization,
                      threads: int) -> Predictor:
    # Loaded once per worker process and kept: a worker runs many tiles.
    if threads > 0:
        torch.set_num_threads(threads)
    model = load_model(checkpoint, device="cpu", dtype=dtype)
    here = None if model.source is None else model.source.checksum
    if here != checksum:  # another file at that path here: its embeddings must not sign as ours
        raise ValueError(f"the checkpoint {checkpoint} on this worker is not the client's ({here} against "
                         f"{checksum}): give every worker the same file")
    return Predictor(model, normalization, traced=False)


@functools.lru_cache(maxsize=4)
def _worker_store(cache: str, key: str) -> EmbeddingStore:
    return EmbeddingStore.attach(cache, key)


def _embed_job(job: _Job, source: ImageSource | None, region: np.ndarray | None) -> tuple[int, int, int]:
    """The task run on a worker: read the tile (unless given), embed it, write it."""
    predictor = _worker_predictor(job.checkpoint, job.checksum, job.dtype, job.normalization, job.threads)
    if region is None:
        if source is None:
            raise ValueError("an embedding job needs either the tile or the image source to read it from")
        region = source.read(job.entry[0], job.outer)
    features = embed_region(predictor, region, job.limits)
    store = _worker_store(job.cache, job.key)
    if store.removed():  # writing on would leave chunks without metadata, a folder no run could open
        raise FileNotFoundError(f"the embedding cache {job.cache} was removed while embedding: run again to make "
                                "it anew")
    store.write(job.entry, features)
    return job.entry


def _connect(scheduler):
    """A distributed Client for ``scheduler``, and whether we own (and must close) it."""
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        return scheduler, None
    if isinstance(scheduler, str) and scheduler.startswith("local"):
        _, _, n = scheduler.partition(":")
        workers = int(n) if n else max(1, (os.cpu_count() or 2) // 2)
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        return Client(cluster), cluster
    if isinstance(scheduler, str):
        return Client(scheduler), None
    raise ValueError(
        f"scheduler must be None, 'local:N', a scheduler address or a distributed.Client, not {scheduler!r}"
    )


def run_distributed(emb, todo: Iterable[tuple[int, int, int]], scheduler) -> Iterator[tuple[int, int, int]]:
    """Embed the cache entries ``todo`` of an :class:`~napari_sam.core.embeddings.Embeddings`
    on ``scheduler`` ("local:N", an address or a Client), yielding each entry when it is
    stored; closing the generator cancels what is still queued. ``todo`` is consumed a
    window at a time (a few tiles per worker), so a lazy stream of claimed entries
    (:func:`~napari_sam.core.shared_work.share_work`) claims only what is about to run."""
    from distributed import as_completed

    model_source = emb.model.source
    if model_source is None:
        raise ValueError(
            "distributed embedding loads the model from its checkpoint file in each worker: load it with load_model()"
        )
    if emb.store.path is None:  # also a cache that refused a tile, left for one in memory
        raise ValueError("distributed embedding writes into an on-disk cache: give cache=PATH")
    pending = iter(todo)
    head = next(pending, None)
    if head is None:
        return
    pending = chain([head], pending)
    client, cluster = _connect(scheduler)
    owned = cluster is not None
    futures = []
    try:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        threads = max(1, (os.cpu_count() or 1) // n_workers) if owned else 0
        # Zarr-backed sources travel as a reference to their store and each worker reads
        # its own tiles; other arrays are read here and each tile's pixels travel. Either
        # way at most a window of tiles is in flight, so that claims are not hoarded.
        lazy = _reads_itself(emb.source)
        window = (4 if lazy else 2) * n_workers
        # Each task carries the (small) reference itself: scattered data is lost with the
        # worker that held it, and a task whose inputs are its own is run again elsewhere.
        source_ref = emb.source if lazy else None

        def submit(entry):
            tile = emb.grid[entry[1:]]
            job = _Job(
                model_source.path, model_source.checksum, model_source.dtype, emb.normalization, threads,
                str(emb.store.path), emb.store.key, entry, tile.outer, emb.limits_for(entry[0]),
            )
            region = None if lazy else emb.source.read(entry[0], tile.outer)
            fut = client.submit(_embed_job, job, source_ref, region, pure=False)
            futures.append(fut)
            return fut

        queue = as_completed([submit(e) for _, e in zip(range(window), pending)])
        for fut in queue:
            yield fut.result()
            nxt = next(pending, None)
            if nxt is not None:
                queue.add(submit(nxt))
    finally:
        unfinished = [f for f in futures if not f.done()]
        if unfinished:
            client.cancel(unfinished)
        if owned:
            client.close()
            cluster.close()


def _reads_itself(source: ImageSource) -> bool:
    """Whether the source's array pickles as a reference (zarr on disk), not its data."""
    try:
        import zarr

        return isinstance(source.array, zarr.Array) and not isinstance(source.array.store, zarr.storage.MemoryStore)
    except ImportError:  # pragma: no cover
        return False
