"""What keeping an NGFF label pyramid current costs per commit.

    .venv/bin/python benchmarks/label_pyramid.py [--size 4096] [--commits 30]

Writes a random SIZE x SIZE uint8 OME-Zarr (NGFF 0.5, ome-zarr-py's default pyramid of
2x levels, 512-pixel chunks) into a temporary folder, then commits the same 60-pixel
discs at the same random places into (a) a plain Zarr label array and (b) the image's
label image `labels/bench`, whose lower levels are updated after every commit; prints
the median commit time of each and their ratio (compare within one run).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_image

    from napari_sam.core.labels import LabelWriter, create_label_store
    from napari_sam.core.masks import PlaneMask
    from napari_sam.core.ngff import open_label_image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--commits", type=int, default=30)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="napari-sam-bench-"))
    image = np.random.default_rng(0).integers(0, 255, (args.size, args.size), dtype=np.uint8)
    root = zarr.open_group(str(folder / "image.ome.zarr"), mode="w", zarr_format=3)
    write_image(image, root, axes="yx", fmt=FormatV05(), storage_options={"chunks": (512, 512)})
    label = open_label_image(folder / "image.ome.zarr", "bench")
    writers = {
        "plain Zarr array": LabelWriter(create_label_store(folder / "plain.zarr", image.shape)),
        f"NGFF label image ({len(label.levels)} levels)": LabelWriter(label.data, on_write=label.update),
    }
    yy, xx = np.mgrid[:60, :60]
    disc = (yy - 30) ** 2 + (xx - 30) ** 2 < 900
    places = np.random.default_rng(1).integers(0, args.size - 60, (args.commits, 2))
    medians = {}
    for name, writer in writers.items():
        times = []
        for y, x in places.tolist():
            start = time.perf_counter()
            writer.commit((), [PlaneMask((y, y + 60, x, x + 60), disc, 1.0, ())])
            times.append(time.perf_counter() - start)
        medians[name] = float(np.median(times))
        print(f"{name:32s} median commit {1000 * medians[name]:.1f} ms")
    plain, pyramid = medians.values()
    print(f"pyramid / plain: {pyramid / plain:.1f}x")


if __name__ == "__main__":
    main()
