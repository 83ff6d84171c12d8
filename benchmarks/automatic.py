"""Segment everything with a model's instance decoder: speed of AIS on a large plane from
cached embeddings, and 3D linking on the GoNuclear stack.

    .venv/bin/python benchmarks/automatic.py [--model default] [--threads 2] [--repeats 5] [--augment]

1. **AIS speed**: a 1024 x 1024 plane tiled from the held-out 2D nuclei sample (four
   copies of its 512 x 512 image) is embedded once (not timed), then AIS runs ``--repeats``
   times on the cached embeddings; prints the median time of the decoder's maps, of the
   post-processing, and of both (what a user waits after the embedding is cached);
   ``--augment`` adds AIS with test-time augmentation (:mod:`napari_sam.auto.augmentation`).
2. **3D linking**: every plane of ``../shared/data/gonuclear_3d`` (100 x 100 x 100, 54
   nuclei; never trained on) segmented in each mode the model offers (the grid only with
   ``--grid``: minutes per plane) and linked through z
   (:func:`napari_sam.auto.modes.segment_volume`; ``--augment``: also augmented AIS),
   next to the classical baseline run per plane and linked the same way; prints
   object-level precision, recall and F1 at IoU 0.5 of the 3D objects
   (:func:`napari_sam.evaluate.metrics.object_f1`) and mSA over the volume.

Figures depend on the machine: the header prints the CPU (``lscpu``) and torch's threads.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GONUCLEAR = ROOT.parent / "shared" / "data" / "gonuclear_3d"


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "")
    return (f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs, "
            f"avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}")


def ais_speed(model, repeats: int, augment: bool = False) -> None:
    from napari_sam._sample_data import nuclei_2d
    from napari_sam.auto.ais import AISSettings, instances_from_maps
    from napari_sam.auto.instance_maps import iter_instance_maps
    from napari_sam.auto.modes import reads_native_scale
    from napari_sam.auto.recommend import recommended
    from napari_sam.auto.results import run
    from napari_sam.core.embeddings import Embeddings

    image = nuclei_2d()[0][0]
    plane = np.block([[image, image[:, ::-1]], [image[::-1], image[::-1, ::-1]]])
    # the embeddings AIS reads in the plugin: at magnification 1, or the prompts' (magnified)
    # ones for a decoder trained scale-matched, which means more tiles to decode
    emb = Embeddings(plane, model, cache=False, magnification=1.0 if reads_native_scale(model) else None)
    settings = recommended(model).ais if model.instance_decoder is not None else AISSettings()
    run(iter_instance_maps(emb, 0, model.instance_decoder))  # embeds every tile once
    maps_t, post_t, n = [], [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        maps = run(iter_instance_maps(emb, 0, model.instance_decoder))
        t1 = time.perf_counter()
        labels = instances_from_maps(maps[0], maps[1], maps[2], settings)
        t2 = time.perf_counter()
        maps_t.append(t1 - t0)
        post_t.append(t2 - t1)
        n = int(labels.max())
    total = np.median(np.add(maps_t, post_t))
    print(f"AIS on a {plane.shape[0]} x {plane.shape[1]} plane ({len(emb.grid)} tiles), cached embeddings, "
          f"median of {repeats}: maps {np.median(maps_t):.3f} s + post-processing {np.median(post_t):.3f} s "
          f"= {total:.3f} s; {n} objects")
    if augment:
        from napari_sam.auto.augmentation import iter_augmented_maps

        t0 = time.perf_counter()
        maps = run(iter_augmented_maps(emb, 0, model.instance_decoder))  # magnified views cached after this
        t1 = time.perf_counter()
        run(iter_augmented_maps(emb, 0, model.instance_decoder))
        t2 = time.perf_counter()
        labels = instances_from_maps(maps[0], maps[1], maps[2], settings)
        t3 = time.perf_counter()
        print(f"AIS augmented (12 views) on the same plane: {t1 - t0:.1f} s with every extra view embedded, "
              f"{t2 - t1:.1f} s with the magnified views cached (mirrored ones are always embedded) "
              f"+ post-processing {t3 - t2:.3f} s; {int(labels.max())} objects")


def linking(model, grid: bool, augment: bool = False) -> None:
    import tifffile

    from napari_sam.auto.link import link_planes
    from napari_sam.auto.modes import available_modes, segment_volume
    from napari_sam.core.embeddings import Embeddings
    from napari_sam.evaluate.automatic import watershed_segmenter
    from napari_sam.evaluate.metrics import instance_scores, object_f1

    volume = tifffile.imread(next((GONUCLEAR / "images").glob("*.tif")))
    truth = tifffile.imread(next((GONUCLEAR / "labels").glob("*.tif")))
    emb = Embeddings(volume, model, cache=False, axes="ZYX")
    rows = []
    for mode in available_modes(model):
        if mode == "auto" and not grid:
            continue
        t0 = time.perf_counter()
        found = segment_volume(emb, mode)
        rows.append((mode, found, time.perf_counter() - t0))
        if mode == "ais" and augment:
            t0 = time.perf_counter()
            found = segment_volume(emb, mode, augment=True)
            rows.append(("ais, augmented", found, time.perf_counter() - t0))
    segment = watershed_segmenter()
    t0 = time.perf_counter()
    baseline = link_planes([np.asarray(segment(p)) for p in volume])
    rows.append(("watershed baseline", baseline, time.perf_counter() - t0))
    print(f"\n3D linking on gonuclear_3d {volume.shape}, {len(np.unique(truth)) - 1} nuclei "
          "(objects matched at 3D IoU > 0.5)")
    print("| method | 3D objects | precision | recall | F1 | mSA (3D) | s |")
    print("|---|---|---|---|---|---|---|")
    for name, found, seconds in rows:
        f1 = object_f1(truth, found)
        msa = instance_scores(truth, found)["msa"]
        print(f"| {name} | {f1['n_pred']} | {f1['precision']:.3f} | {f1['recall']:.3f} | {f1['f1']:.3f} "
              f"| {msa:.3f} | {seconds:.0f} |")


def main() -> None:
    import torch

    from napari_sam.core.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--grid", action="store_true", help="also the point grid in 3D (slow)")
    parser.add_argument("--augment", action="store_true", help="also AIS with test-time augmentation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu", dtype="float32")
    print(f"{_cpu()}; torch {torch.__version__}, {args.threads} threads; model {args.model}")
    if model.instance_decoder is None:
        raise SystemExit(f"{args.model} has no instance decoder: nothing to measure")
    ais_speed(model, args.repeats, args.augment)
    linking(model, args.grid, args.augment)


if __name__ == "__main__":
    main()
