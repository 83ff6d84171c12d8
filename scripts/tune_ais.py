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
"""

from __future__ import annotations

import argparse
import itertools
import json
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
from napari_sam.evaluate.metrics import instance_scores

DSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018_fluo"
GRID = {
    "center_distance_threshold": (0.5, 0.7, 0.9),
    "boundary_distance_threshold": (0.5, 0.6, 0.7, 0.8),
    "foreground_threshold": (0.5, 0.6, 0.7),
    "min_size": (0, 25),
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu", dtype="float32")
    names = sorted(p.name for p in (DSB / "images").glob("*.tif"))[:-5][::3]
    if args.augment:
        compare_augmentations(model, [(tifffile.imread(DSB / "images" / n), tifffile.imread(DSB / "labels" / n))
                                      for n in names])
        return
    data = []
    for name in names:
        image, labels = tifffile.imread(DSB / "images" / name), tifffile.imread(DSB / "labels" / name)
        data.append((labels, maps_of(model, image)))
        print(f"maps of {name}", flush=True)
    rows = []
    for values in itertools.product(*GRID.values()):
        settings = AISSettings(**dict(zip(GRID, values)))
        scores = [instance_scores(gt, instances_from_maps(m[0], m[1], m[2], settings)) for gt, m in data]
        rows.append((float(np.mean([s["msa"] for s in scores])), float(np.mean([s["ap50"] for s in scores])), values))
    rows.sort(reverse=True)
    print("mSA    AP50   " + "  ".join(GRID))
    for msa, ap50, values in rows[:10]:
        print(f"{msa:.3f}  {ap50:.3f}  " + "  ".join(f"{v:g}" for v in values))
    default = AISSettings()
    for what, settings in (("micro-sam's defaults", default), ("the model's advice", recommended(model).ais)):
        scores = [instance_scores(gt, instances_from_maps(m[0], m[1], m[2], settings)) for gt, m in data]
        print(f"{what}: mSA {np.mean([s['msa'] for s in scores]):.3f}  "
              f"AP50 {np.mean([s['ap50'] for s in scores]):.3f}")
    best = dict(zip(GRID, rows[0][2]))
    print("best: " + json.dumps({k: v for k, v in best.items() if v != getattr(default, k)}))


if __name__ == "__main__":
    main()
