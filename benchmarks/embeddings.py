"""Tiled embedding of a Zarr volume larger than memory budgets: throughput, memory, disk.

    python benchmarks/embeddings.py                     # 16 x 4096 x 4096 and 16 x 8192 x 8192
    python benchmarks/embeddings.py --planes 2 --workers 2

Builds synthetic uint16 volumes (nuclei-like blobs on noise, chunked (1, 512, 512) as
microscopy Zarr files usually are) in a scratch folder, and embeds them with ``vit_t``
(MobileSAM's encoder; random weights: the time does not depend on them). Prints one JSON
object per line:

* ``planes_per_s`` serially and with ``--workers`` dask worker processes (LocalCluster);
* ``peak_rss_mib`` of a process that embeds tiles of each volume: it must not grow with
  the volume (each task reads one tile and its halo, and writes it to the cache);
* ``cache_mib_per_plane`` on disk, stored as float32 and as float16;
* ``tiles_per_plane`` and the resampling factor for a few tile sizes (the encoder's cost
  is per tile, so this is what decides the default tile).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def emit(**record) -> None:
    print(json.dumps({"impl": "napari_sam", **record}), flush=True)


def make_volume(path: Path, planes: int, side: int, chunk: int = 512) -> None:
    import zarr

    z = zarr.create_array(str(path), shape=(planes, side, side), dtype="uint16", chunks=(1, chunk, chunk),
                          overwrite=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:chunk, 0:chunk]
    for p in range(planes):
        for y in range(0, side, chunk):
            # one band of chunks at a time: memory stays at a band, whatever the volume
            band = rng.normal(400, 40, (chunk, side)).astype(np.float32)
            for _ in range(side // 64):
                cy, cx, r = rng.integers(0, chunk), rng.integers(0, side), rng.integers(6, 20)
                y0, y1, x0, x1 = max(cy - r, 0), min(cy + r, chunk), max(cx - r, 0), min(cx + r, side)
                d = (yy[y0:y1, :1] - cy) ** 2 + (np.arange(x0, x1)[None] - cx) ** 2
                band[y0:y1, x0:x1] += 3000 * (d < r * r)
            z[p, y : y + chunk, :] = band.clip(0, 65535).astype(np.uint16)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    """Embed ``--max-tiles`` tiles of plane 0 in this process and report its peak memory."""
    import zarr

    from napari_sam.core.embeddings import Embeddings
    from napari_sam.core.models import load_model

    model = load_model(args.checkpoint, dtype="float32")
    base = peak_rss_mib()
    emb = Embeddings(zarr.open_array(args.volume, mode="r"), model, args.cache, axes="ZYX", storage=args.storage)
    entries = emb.entries([0])[: args.max_tiles]
    t = time.perf_counter()
    for e in entries:
        emb.embedding_for(e[0], e[1:])
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "model_rss_mib": base, "tiles": len(entries),
                      "s_per_tile": (time.perf_counter() - t) / len(entries)}))


def run_child(volume: Path, checkpoint: Path, cache: Path, max_tiles: int, storage: str = "float32") -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--volume", str(volume), "--checkpoint", str(checkpoint),
         "--cache", str(cache), "--max-tiles", str(max_tiles), "--storage", storage],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--planes", type=int, default=1, help="planes embedded for the throughput figures")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-tiles", type=int, default=12, help="tiles embedded for the memory figures")
    ap.add_argument("--sides", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--scratch", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--volume", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--storage", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import torch
    import zarr

    from napari_sam.core.embeddings import Embeddings
    from napari_sam.core.models import load_model
    from napari_sam.core.tiling import DEFAULT_HALO, DEFAULT_TILE, TileGrid
    from napari_sam.model import build_sam

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="napari-sam-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    checkpoint = scratch / "vit_t_random.pth"
    torch.manual_seed(0)
    torch.save(build_sam("vit_t").state_dict(), checkpoint)
    threads = torch.get_num_threads()

    for tile in (512, 768, 1024):
        grid = TileGrid((4096, 4096), tile, DEFAULT_HALO)
        outer = tile + 2 * DEFAULT_HALO
        emit(what="tiles_per_plane", plane=4096, tile=tile, halo=DEFAULT_HALO, tiles=len(grid),
             resampling=round(1024 / outer, 3), default=tile == DEFAULT_TILE)

    volumes = {}
    for side in args.sides:
        vol = scratch / f"vol_{args.depth}x{side}.zarr"
        if not vol.exists():
            t = time.perf_counter()
            make_volume(vol, args.depth, side)
            emit(what="made_volume", shape=[args.depth, side, side], seconds=round(time.perf_counter() - t, 1),
                 raw_gib=round(args.depth * side * side * 2 / 2**30, 2), disk_mib=round(dir_mib(vol)))
        volumes[side] = vol

    # Throughput on the first volume: serial here, then a LocalCluster.
    side = args.sides[0]
    model = load_model(checkpoint, dtype="float32")
    z = zarr.open_array(str(volumes[side]), mode="r")
    planes = list(range(args.planes))
    rates = {}
    for label, scheduler in (("serial", None), (f"{args.workers}_workers", f"local:{args.workers}")):
        cache = scratch / f"cache_{label}.zarr"
        shutil.rmtree(cache, ignore_errors=True)
        emb = Embeddings(z, model, cache, axes="ZYX")
        t = time.perf_counter()
        emb.compute_all(planes=planes, scheduler=scheduler, progress=False)
        seconds = time.perf_counter() - t
        rates[label] = len(planes) / seconds
        emit(what="planes_per_s", scheduler=label, plane=[side, side], tiles_per_plane=len(emb.grid),
             planes=len(planes), seconds=round(seconds, 1), planes_per_s=round(rates[label], 4), threads=threads)
        emit(what="cache_mib_per_plane", storage="float32", mib=round(dir_mib(cache) / len(planes), 1))
    emit(what="speedup", workers=args.workers, ratio=round(rates[f"{args.workers}_workers"] / rates["serial"], 2),
         cores=os.cpu_count())

    for side, vol in volumes.items():
        for storage in ("float32", "float16"):
            cache = scratch / f"cache_mem_{side}_{storage}.zarr"
            shutil.rmtree(cache, ignore_errors=True)
            r = run_child(vol, checkpoint, cache, args.max_tiles, storage)
            emit(what="peak_rss_mib", volume=[args.depth, side, side],
                 volume_gib=round(args.depth * side * side * 2 / 2**30, 2),
                 storage=storage, **r, cache_mib_per_tile=round(dir_mib(cache) / r["tiles"], 2))
    print(f"scratch data left in {scratch}", file=sys.stderr)


if __name__ == "__main__":
    main()
