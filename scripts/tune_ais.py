"""Choose AIS post-processing thresholds for a model's instance decoder, on training images.

The instance decoder's maps of each image are computed once (as ``segment --mode ais``
computes them: tiles, magnification per ``napari_sam.auto.modes.reads_native_scale``),
then every combination of the thresholds below is post-processed and scored (mSA, AP50;
``napari_sam.evaluate.metrics``). Only images the model was trained on are used: by
default every third of the first 16 ``dsb2018_fluo`` images by name (the last 5 are the
default model's held-out images, never tuned on). Prints the table and the best
settings as JSON, for ``AIS_ADVICE`` in scripts/train_default_instance_decoder.py::

    .venv/bin/python scripts/tune_ais.py --model CHECKPOINT

With ``--augment`` it compares sets of test-time augmentation views instead
(``napari_sam.auto.augmentation``: scales, with and without the four mirrorings) under the
model's advice, on the same training images; ``augmentation.DEFAULT`` was chosen so.

With ``--stained`` it tunes the settings for planes read as their haematoxylin stain
(``AIS_STAINED_ADVICE``) on the six H&E images the default model was trained on (the four
``dsb2018_he_brightfield`` images and the two ``cryonuseg_he_examples`` tiles; never
MoNuSeg, which is for evaluation only): the distance smoothing as a share of each plane's
estimated object diameter, and the boundary and foreground thresholds, the rest as the
model's AIS advice.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import tifffile
import torch

from napari_sam.auto.ais import AISSettings, instances_from_maps
from napari_sam.auto.augmentation import Augmentation, iter_augmented_maps
from napari_sam.auto.instance_maps import iter_instance_maps
from napari_sam.auto.modes import reads_native_scale
from napari_sam.auto.recommend import recommended
from napari_sam.auto.results import run
from napari_sam.core.embeddings import Embeddings
from napari_sam.core.models import load_model
from napari_sam.core.scale import estimate_diameter
from napari_sam.evaluate.metrics import instance_scores

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DSB = DATA / "dsb2018_fluo"
H_AND_E = (DATA / "dsb2018_he_brightfield", DATA / "cryonuseg_he_examples")
GRID = {
    "center_distance_threshold": (0.5, 0.7, 0.9),
    "boundary_distance_threshold": (0.5, 0.6, 0.7, 0.8),
    "foreground_threshold": (0.5, 0.6, 0.7),
    "min_size": (0, 25),
}
STAINED_GRID = {
    "distance_smoothing_per_diameter": (0.167, 0.143, 0.125, 0.111, 0.1),
    "boundary_distance_threshold": (0.6, 0.7, 0.8),
    "foreground_threshold": (0.4, 0.5),
}


def maps_of(model, image: np.ndarray) -> np.ndarray:
    """(3, H, W) instance maps of one plane, read from the embeddings AIS would read."""
    emb = Embeddings(image, model, cache=False, axes="YX" if image.ndim == 2 else "YXC",
                     magnification=1.0 if reads_native_scale(model) else None)
    return run(iter_instance_maps(emb, 0, model.instance_decoder))


SCALE_SETS = ((1.0,), (1.0, 1.5), (1.0, 2.0), (1.0, 1.5, 2.0), (1.0, 1.25, 1.5, 2.0), (1.25, 1.5, 2.0),
              (1.5, 2.0), (0.75, 1.0, 1.5, 2.0))


def compare_augmentations(model, images: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """mSA and AP50 of AIS (the model's advice) for each set of views, on (image, labels) pairs."""
    advice = recommended(model).ais
    scales = sorted({s for group in SCALE_SETS for s in group})
    per_image = []  # {(scale, flips): mean maps of that scale's views}
    for image, _ in images:
        emb = Embeddings(image, model, cache=False, axes="YX" if image.ndim == 2 else "YXC",
                         magnification=1.0 if reads_native_scale(model) else None)
        per_image.append({(s, f): run(iter_augmented_maps(emb, 0, model.instance_decoder, Augmentation((s,), f)))
                          for s in scales for f in (False, True)})
        print(f"views of image {len(per_image)}/{len(images)}", flush=True)
    print("mSA    AP50   scales  mirrored")
    for group in SCALE_SETS:
        for flips in (False, True):
            scores = []
            for (_, labels), views in zip(images, per_image):
                maps = np.mean([views[s, flips] for s in group], axis=0)  # equal views per scale
                scores.append(instance_scores(labels, instances_from_maps(maps[0], maps[1], maps[2], advice)))
            print(f"{np.mean([x['msa'] for x in scores]):.3f}  {np.mean([x['ap50'] for x in scores]):.3f}  "
                  f"{','.join(f'{s:g}' for s in group)}  {'yes' if flips else 'no'}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--augment", action="store_true", help="compare test-time augmentation views instead")
    parser.add_argument("--stained", action="store_true",
                        help="tune the settings for planes read as their haematoxylin stain, on H&E training images")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu", dtype="float32")
    names = sorted(p.name for p in (DSB / "images").glob("*.tif"))[:-5][::3]
    if args.augment:
        compare_augmentations(model, [(tifffile.imread(DSB / "images" / n), tifffile.imread(DSB / "labels" / n))
                                      for n in names])
        return
    advice = recommended(model)
    if args.stained:
        files = [(folder, p.name) for folder in H_AND_E for p in sorted((folder / "images").glob("*.tif"))]
        grid, start = STAINED_GRID, advice.ais
        compared = (("the model's AIS advice", advice.ais), ("its advice for stained planes", advice.ais_stained))
    else:
        files, grid, start = [(DSB, n) for n in names], GRID, AISSettings()
        compared = (("micro-sam's defaults", start), ("the model's advice", advice.ais))
    data = []
    for folder, name in files:
        image, labels = tifffile.imread(folder / "images" / name), tifffile.imread(folder / "labels" / name)
        data.append((labels, maps_of(model, image), estimate_diameter(image)))
        print(f"maps of {name}", flush=True)

    def scored(settings):
        scores = [instance_scores(gt, instances_from_maps(m[0], m[1], m[2], settings, d)) for gt, m, d in data]
        return float(np.mean([s["msa"] for s in scores])), float(np.mean([s["ap50"] for s in scores]))

    rows = sorted((*scored(replace(start, **dict(zip(grid, values)))), values)
                  for values in itertools.product(*grid.values()))[::-1]
    print("mSA    AP50   " + "  ".join(grid))
    for msa, ap50, values in rows[:10]:
        print(f"{msa:.3f}  {ap50:.3f}  " + "  ".join(f"{v:g}" for v in values))
    for what, settings in compared:
        if settings is not None:
            msa, ap50 = scored(settings)
            print(f"{what}: mSA {msa:.3f}  AP50 {ap50:.3f}")
    best = dict(zip(grid, rows[0][2]))
    print("best: " + json.dumps({k: v for k, v in best.items() if v != getattr(start, k)}))


if __name__ == "__main__":
    main()
