"""Reference instances from micro-sam's own AIS post-processing, made with the ORIGINAL code.

micro-sam turns its instance decoder's three maps (foreground, normalised distances to the
object's centre and boundary) into instances with
``InstanceSegmentationWithDecoder.generate`` (a seeded watershed through torch-em's
``watershed_from_center_and_boundary_distances`` and bioimage-cpp's filters). This script
draws a random plane of touching and isolated ellipses of many sizes, turns it into the
decoder's training targets with torch-em's ``PerObjectDistanceTransform`` (as micro-sam's
trainer does), perturbs them the way a decoder's prediction differs from its target (blur
and noise, seeded), hands the maps to micro-sam through ``set_state`` and writes the labels
that ``generate`` returns, once with its defaults and once with the settings its annotator
preselects for ``vit_b_lm``. ``tests/auto/test_ais.py`` compares
``napari_sam.auto.ais.instances_from_maps`` with them.

It is NOT part of the package and never runs in the project's venv: run it in the venv of
the original code (see ``scripts/make_instance_decoder_reference.py``, whose torchvision
stand-ins it reuses: torchvision does not load beside torch 2.13 there, and the
post-processing never calls it):

    /work/refvenv/bin/python scripts/make_ais_reference.py --seed 0 --out tests/reference/ais/seed0

micro-sam 1.8.14 needs bioimage-cpp, python-elf, torch-em and zarr for this (all in that venv).

Layout of a set (``numpy.load``):

- ``data.npz``: ``instances`` (H, W) uint16, the drawn plane (each connected piece of an
  ellipse one object, as torch-em sees it); ``targets`` (3, H, W)
  float16, torch-em's targets of it (foreground, centre distances, boundary distances);
  ``maps`` (3, H, W) float16, the perturbed maps given to micro-sam (as float32, exactly
  these values); and per case ``labels_<case>`` (H, W) uint32, micro-sam's result;
- ``meta.json``: seed, shape, package versions, and each case's ``generate`` arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

CASES = {
    # InstanceSegmentationWithDecoder.generate's own defaults
    "default": {},
    # what micro-sam's annotator preselects for vit_b_lm (micro_sam/_model_settings.py)
    "vit_b_lm": {"center_distance_threshold": 0.4, "boundary_distance_threshold": 0.5,
                 "distance_smoothing": 2.0, "min_size": 100},
}


def _draw(shape: tuple[int, int], n: int, rng: np.random.Generator) -> np.ndarray:
    """Random ellipses, later ones painted over earlier ones (so that many touch)."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.uint16)
    for i in range(1, n + 1):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        a, b = rng.uniform(3, 16), rng.uniform(3, 16)
        t = rng.uniform(0, np.pi)
        dy, dx = rows - cy, cols - cx
        u = (dx * np.cos(t) + dy * np.sin(t)) / a
        v = (-dx * np.sin(t) + dy * np.cos(t)) / b
        out[u * u + v * v <= 1] = i
    return out


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True, help="seed of the plane and the perturbation")
    parser.add_argument("--out", type=Path, required=True, help="folder of the set (created; must not hold a set)")
    parser.add_argument("--shape", type=int, nargs=2, default=(128, 192), metavar=("ROWS", "COLS"))
    parser.add_argument("--objects", type=int, default=40, help="ellipses drawn (some end up hidden)")
    args = parser.parse_args(argv)
    if (args.out / "meta.json").exists():
        parser.error(f"{args.out} already holds a reference set; choose another --out")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_instance_decoder_reference import _torchvision_stand_ins

    stood_in = _torchvision_stand_ins()
    from micro_sam.instance_segmentation import InstanceSegmentationWithDecoder
    from scipy import ndimage as ndi
    from skimage.measure import label
    from torch_em.transform.label import PerObjectDistanceTransform

    rng = np.random.default_rng(args.seed)
    # connected pieces of equal value, numbered as torch-em numbers them before its targets
    instances = label(_draw(tuple(args.shape), args.objects, rng)).astype(np.uint16)
    # micro-sam's trainer builds the decoder's targets with exactly these arguments
    targets = PerObjectDistanceTransform(
        distances=True, boundary_distances=True, directed_distances=False, foreground=True, min_size=0,
    )(instances).astype(np.float32)
    blurred = np.stack([ndi.gaussian_filter(t, 1.0) for t in targets])
    maps = np.clip(blurred + rng.normal(0, 0.08, targets.shape), 0, 1).astype(np.float16)

    data = {"instances": instances, "targets": targets.astype(np.float16), "maps": maps}
    used = maps.astype(np.float32)
    for case, kwargs in CASES.items():
        # micro-sam's own post-processing, given maps instead of a decoder's output
        segmenter = InstanceSegmentationWithDecoder(predictor=None, decoder=None)
        segmenter.set_state({"foreground": used[0], "center_distances": used[1], "boundary_distances": used[2]})
        labels = segmenter.generate(**kwargs)
        data[f"labels_{case}"] = np.asarray(labels).astype(np.uint32)
        print(f"{case}: {len(np.unique(labels)) - 1} objects")

    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "data.npz", **data)
    meta = {
        "seed": args.seed,
        "shape": list(args.shape),
        "objects_drawn": args.objects,
        "drawn_instances": int(len(np.unique(instances)) - 1),
        "perturbation": "Gaussian blur sigma 1 per map, then normal noise sd 0.08, clipped to [0, 1], float16",
        "cases": {case: {"generate": kwargs} for case, kwargs in CASES.items()},
        "versions": {name: _version(name) for name in
                     ("micro_sam", "torch_em", "bioimage-cpp", "python-elf", "numpy", "scipy", "scikit-image")},
        "python": sys.version.split()[0],
        "torchvision_stand_ins": stood_in,
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
