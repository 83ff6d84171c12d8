"""``napari-sam embed``, ``info`` and ``caches``: the embedding cache."""

from __future__ import annotations

import time

__all__ = ["DAMAGE_FOUND", "caches", "embed", "info"]

DAMAGE_FOUND = 3
"""``info --verify``'s exit status when a tile is damaged or missing."""


def embed(args) -> int:
    from pathlib import Path

    from ..core.embeddings import Embeddings
    from ..core.image_source import ImageSource
    from ..core.models import resolve_model
    from ..core.outputs import check_folder_writable, check_not_an_input
    from ..core.tiling import default_tiling
    from .inputs import check_planes, check_tiling

    # Everything the request can get wrong is checked before the model loads.
    check_tiling(args.tile, args.halo)
    if args.out is not None:
        check_not_an_input(args.out, {"image": args.image})
        out = Path(args.out).expanduser()
        check_folder_writable(out if out.is_dir() else out.parent)
    source = ImageSource.open(args.image, axes=args.axes, channel=args.channel)
    check_planes(args.planes, source.n_planes)
    model = resolve_model(args.model, device=args.device, dtype=args.dtype)
    auto_tile, auto_halo = default_tiling(model.config.image_size)
    check_tiling(args.tile, args.halo, auto_tile, auto_halo)  # one of them left to the model's default
    emb = Embeddings(
        source,
        model,
        args.out,
        tile=args.tile,
        halo=args.halo,
        statistics=args.statistics,
        storage=args.storage,
        on_mismatch=args.on_mismatch,
        magnification=args.magnification,
        diameter=args.diameter,
    )
    rows, cols = emb.grid.grid_shape
    print(f"{emb.source.describe()}; {rows}x{cols} tile(s) per plane (magnification {emb.magnification:g}); "
          f"cache {emb.cache_path} ({emb.store.key})")
    t0 = time.perf_counter()
    done = emb.compute_all(planes=args.planes, scheduler=args.scheduler)
    print(f"{done} tile(s) cached in {time.perf_counter() - t0:.1f} s")
    return 0


def info(args) -> int:
    """Print what a cache holds; with ``--verify`` read every tile: exit 3 if any is damaged
    or missing (1 is a bug, 2 a mistake in the request), else 0."""
    from ..core.embedding_store import describe_cache
    from ..core.signature import describe_fingerprint

    entries = describe_cache(args.cache, verify=args.verify)
    bad = sum(len(e["check"].damaged) + len(e["check"].missing) for e in entries if e["check"] is not None)
    if args.json:
        _print_json({"cache": str(args.cache), "entries": [_entry_json(e) for e in entries]})
        return DAMAGE_FOUND if bad else 0
    if not entries:
        print(f"{args.cache}: an embedding cache with no entries yet")
    for e in entries:
        s = e["signature"]
        print(f"[{e['key']}] {s['model']} ({s['dtype']}, {s['checkpoint'][:23]}...)")
        print(f"  image     {'x'.join(map(str, s['shape']))} {s['axes']} {s['dtype_in']}, channel {s['channel']}, "
              f"{s['image_fingerprint'].split(':')[-1][:16]}...")
        print(f"  image fingerprint: {describe_fingerprint(s['image_fingerprint'])}")
        print(f"  tiles     {e['layout'][1]}x{e['layout'][2]} per plane, tile {s['tile']} + halo {s['halo']}")
        print(f"  intensity {s['normalization']}")
        print(f"  entries   {e['present']}/{e['total']} present, {e['bytes'] / 2**20:.1f} MiB on disk, "
              f"stored as {s['storage']}")
        check = e["check"]
        if check is None:
            print("  tiles counted, not checked: --verify reads each one against its checksum")
            continue
        print(f"  verified  {check.checked} tile(s) read: {len(check.damaged)} damaged, {len(check.missing)} missing")
        for what, found in (("damaged", check.damaged), ("missing", check.missing)):
            for plane, row, col in found:
                print(f"  {what:9} plane {plane}, tile row {row}, col {col}")
    if bad:
        print(f"{bad} tile(s) damaged or missing: the next `napari-sam embed` on this cache computes them again")
    return DAMAGE_FOUND if bad else 0


def caches(args) -> int:
    """List the user cache folder's embedding caches; remove old or excess ones when asked."""
    from datetime import datetime

    from ..core import cache_housekeeping as housekeeping

    folder = housekeeping.user_cache_folder()
    found = housekeeping.user_caches(folder)
    listing = args.older_than is None and args.max_size is None
    if args.json and listing:
        _print_json({"folder": str(folder), "caches": [_summary_json(c) for c in found],
                     "bytes": sum(c.bytes for c in found)})
        return 0
    if listing:
        if not found:
            print(f"{folder}: no embedding caches")
            return 0
        for c in found:
            used = datetime.fromtimestamp(c.last_used).strftime("%Y-%m-%d %H:%M")
            kinds = {e: c.entries.count(e) for e in c.entries}  # several tilings of one image are one line
            what = "; ".join(e + (f" ({n} entries)" if n > 1 else "") for e, n in kinds.items())
            what = what or "no complete entries"
            print(f"{c.path.name}  {_size(c.bytes):>9}  last used {used}{'  (being written)' if c.busy else ''}  "
                  f"{what}")
        print(f"{len(found)} cache(s), {_size(sum(c.bytes for c in found))} in {folder}")
        return 0
    max_bytes = None if args.max_size is None else int(args.max_size * 1e9)
    gone = housekeeping.remove(found, older_than_days=args.older_than, max_bytes=max_bytes, dry_run=args.dry_run)
    left = sum(c.bytes for c in found) - sum(c.bytes for c in gone)
    if args.json:
        _print_json({"folder": str(folder), "dry_run": bool(args.dry_run), "removed": [_summary_json(c) for c in gone],
                     "bytes_removed": sum(c.bytes for c in gone), "bytes_left": left})
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for c in gone:
        print(f"{verb} {c.path.name} ({_size(c.bytes)})")
    print(f"{verb} {len(gone)} cache(s), {_size(sum(c.bytes for c in gone))}; {_size(left)} left in {folder}")
    return 0


def _print_json(report: dict) -> None:
    import json

    print(json.dumps(report, indent=1))


def _entry_json(entry: dict) -> dict:
    """One ``describe_cache`` entry as plain JSON: the check's tiles as [plane, row, col]."""
    check = entry["check"]
    if check is not None:
        check = {"checked": check.checked, "damaged": [list(t) for t in check.damaged],
                 "missing": [list(t) for t in check.missing]}
    return {k: v for k, v in entry.items() if k != "check"} | {"check": check}


def _summary_json(cache) -> dict:
    """A :class:`~napari_sam.core.cache_housekeeping.CacheSummary` as plain JSON (times in UTC)."""
    from datetime import datetime, timezone

    used = datetime.fromtimestamp(cache.last_used, timezone.utc).isoformat(timespec="seconds")
    return {"name": cache.path.name, "path": str(cache.path), "bytes": cache.bytes, "last_used": used,
            "busy": cache.busy, "entries": list(cache.entries)}


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
