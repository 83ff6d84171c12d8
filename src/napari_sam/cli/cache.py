"""``napari-sam embed`` and ``napari-sam info``: the embedding cache."""

from __future__ import annotations

import time

__all__ = ["embed", "info"]


def embed(args) -> int:
    from ..core.embeddings import Embeddings
    from ..core.image_source import ImageSource
    from ..core.models import resolve_model

    source = ImageSource.open(args.image, axes=args.axes, channel=args.channel)
    model = resolve_model(args.model, device=args.device, dtype=args.dtype)
    emb = Embeddings(
        source,
        model,
        args.out,
        tile=args.tile,
        halo=args.halo,
        statistics=args.statistics,
        storage=args.storage,
        on_mismatch=args.on_mismatch,
    )
    rows, cols = emb.grid.grid_shape
    print(f"{source.describe()}; {rows}x{cols} tile(s) per plane; cache {emb.cache_path} ({emb.store.key})")
    t0 = time.perf_counter()
    done = emb.compute_all(planes=args.planes, scheduler=args.scheduler)
    print(f"{done} tile(s) cached in {time.perf_counter() - t0:.1f} s")
    return 0


def info(args) -> int:
    from ..core.embedding_store import describe_cache

    entries = describe_cache(args.cache)
    if not entries:
        print(f"{args.cache}: an embedding cache with no entries yet")
    for e in entries:
        s = e["signature"]
        print(f"[{e['key']}] {s['model']} ({s['dtype']}, {s['checkpoint'][:23]}...)")
        print(f"  image     {'x'.join(map(str, s['shape']))} {s['axes']} {s['dtype_in']}, channel {s['channel']}, "
              f"{s['image_fingerprint'][:23]}...")
        print(f"  tiles     {e['layout'][1]}x{e['layout'][2]} per plane, tile {s['tile']} + halo {s['halo']}")
        print(f"  intensity {s['normalization']}")
        print(f"  entries   {e['present']}/{e['total']} present, {e['bytes'] / 2**20:.1f} MiB on disk, "
              f"stored as {s['storage']}")
    return 0
