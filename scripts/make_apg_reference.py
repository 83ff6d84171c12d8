"""Reference prompts and instances from micro-sam's own APG, made with the ORIGINAL code.

micro-sam's ``AutomaticPromptGenerator.generate`` derives one point prompt per seed
component of its instance decoder's maps, asks SAM for each point's mask
(``micro_sam.inference.batched_inference``), filters the masks (size, then non-maximum
suppression on the masks ranked by predicted IoU times stability) and paints them into
labels (``micro_sam.util.apply_nms``). This script runs exactly that code on a drawn plane:

- the maps are made as ``scripts/make_ais_reference.py`` makes them (random ellipses,
  torch-em's ``PerObjectDistanceTransform`` targets, blurred and noised, seeded);
- SAM is replaced by a *stand-in predictor* whose answer to a point is a fixed function
  of the drawn plane and the point (:func:`stand_in_answer`): the signed distance to the
  boundary of the drawn object under the point, shifted by a per-point offset in
  [-1.5, 1.5) pixels (so masks grow over neighbours or shrink), or a disc of radius 6
  where the point lies on background; its predicted IoU is another per-point number in
  [0.55, 0.95). ``tests/auto/test_apg.py`` computes the same answers, so it tests our
  prompts (``prompt_points``) and our filters and painting (``select_masks``) against
  micro-sam's on identical masks.

It is NOT part of the package and never runs in the project's venv: run it in the venv of
the original code:

    /work/refvenv/bin/python scripts/make_apg_reference.py --seed 0 --out tests/reference/apg/seed0

Layout of a set (``numpy.load``):

- ``data.npz``: ``instances`` (H, W) uint16, the drawn plane; ``maps`` (3, H, W)
  float16, the maps given to micro-sam (as float32, exactly these values); ``points``
  (N, 2) int64 (x, y), the prompts micro-sam derived from them, in its order; and per
  case ``labels_<case>`` (H, W) uint32, micro-sam's result;
- ``meta.json``: seed, shape, versions, and each case's ``generate`` arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

CASES = {
    # AutomaticPromptGenerator.generate's own defaults
    "default": {},
    # the other overlap measure, a lower threshold and smaller objects kept
    "over_min": {"intersection_over_min": True, "nms_threshold": 0.5, "min_size": 10},
    # no size filter at all
    "no_min_size": {"nms_threshold": 0.3, "min_size": 0},
}


def stand_in_answer(instances: np.ndarray, x: int, y: int) -> tuple[np.ndarray, float]:
    """(H, W) float32 logits and the predicted IoU that the stand-in SAM gives a point.

    The same function is in ``tests/auto/test_apg.py``; both must stay equal.
    """
    from scipy import ndimage as ndi

    shift = ((x * 7919 + y * 104729) % 1000) / 1000 * 3 - 1.5
    iou = 0.55 + ((x * 104723 + y * 7907) % 997) / 997 * 0.4
    obj = int(instances[y, x])
    if obj:
        inside = instances == obj
        logits = ndi.distance_transform_edt(inside) - ndi.distance_transform_edt(~inside) - 0.5 + shift
    else:
        rows, cols = np.indices(instances.shape)
        logits = 6.0 - np.hypot(rows - y, cols - x)
    return logits.astype(np.float32), float(iou)


class _StandInPredictor:
    """What ``batched_inference`` reads of a ``SamPredictor``, answering with
    :func:`stand_in_answer`."""

    def __init__(self, instances: np.ndarray):
        import torch
        from segment_anything.utils.transforms import ResizeLongestSide

        self.instances = instances
        self.original_size = instances.shape
        self.device = torch.device("cpu")
        self.model = type("Model", (), {"mask_threshold": 0.0})()
        self.input_shape = ResizeLongestSide.get_preprocess_shape(*instances.shape, 1024)
        self.asked: list[tuple[int, int]] = []

    def get_image_embedding(self):
        return None

    def predict_torch(self, point_coords, point_labels, boxes=None, mask_input=None, multimask_output=False,
                      return_logits=False):
        import torch

        assert boxes is None and mask_input is None and not multimask_output and return_logits
        (H, W), (h, w) = self.original_size, self.input_shape
        masks, ious = [], []
        for xy in point_coords[:, 0].numpy():
            # back from SAM's 1024 frame to the pixel micro-sam derived
            x, y = int(round(float(xy[0]) * W / w)), int(round(float(xy[1]) * H / h))
            self.asked.append((x, y))
            logits, iou = stand_in_answer(self.instances, x, y)
            masks.append(torch.as_tensor(logits)[None])
            ious.append([iou])
        masks = torch.stack(masks)
        return masks, torch.tensor(ious), torch.zeros((len(masks), 1, 256, 256))


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True, help="seed of the plane and the perturbation")
    parser.add_argument("--out", type=Path, required=True, help="folder of the set (created; must not hold a set)")
    parser.add_argument("--shape", type=int, nargs=2, default=(96, 128), metavar=("ROWS", "COLS"))
    parser.add_argument("--objects", type=int, default=25, help="ellipses drawn (some end up hidden)")
    args = parser.parse_args(argv)
    if (args.out / "meta.json").exists():
        parser.error(f"{args.out} already holds a reference set; choose another --out")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_ais_reference import _draw
    from make_instance_decoder_reference import _torchvision_stand_ins

    stood_in = _torchvision_stand_ins()
    from micro_sam.instance_segmentation import AutomaticPromptGenerator, _derive_point_prompts
    from scipy import ndimage as ndi
    from skimage.measure import label
    from torch_em.transform.label import PerObjectDistanceTransform

    rng = np.random.default_rng(args.seed)
    instances = label(_draw(tuple(args.shape), args.objects, rng)).astype(np.uint16)
    targets = PerObjectDistanceTransform(
        distances=True, boundary_distances=True, directed_distances=False, foreground=True, min_size=0,
    )(instances).astype(np.float32)
    blurred = np.stack([ndi.gaussian_filter(t, 1.0) for t in targets])
    maps = np.clip(blurred + rng.normal(0, 0.08, targets.shape), 0, 1).astype(np.float16)
    used = maps.astype(np.float32)

    prompts = _derive_point_prompts(used[0], used[1], used[2])
    points = np.asarray(prompts["points"][:, 0], dtype=np.int64)
    data = {"instances": instances, "maps": maps, "points": points}
    for case, kwargs in CASES.items():
        predictor = _StandInPredictor(instances)
        segmenter = AutomaticPromptGenerator(predictor=predictor, decoder=None)
        segmenter.set_state({"foreground": used[0], "center_distances": used[1], "boundary_distances": used[2]})
        labels = segmenter.generate(**kwargs)
        assert predictor.asked == [tuple(p) for p in points.tolist()], "the stand-in was asked other points"
        data[f"labels_{case}"] = np.asarray(labels).astype(np.uint32)
        print(f"{case}: {len(points)} prompts, {len(np.unique(labels)) - 1} objects")

    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "data.npz", **data)
    meta = {
        "seed": args.seed,
        "shape": list(args.shape),
        "objects_drawn": args.objects,
        "drawn_instances": int(len(np.unique(instances)) - 1),
        "prompts": len(points),
        "perturbation": "Gaussian blur sigma 1 per map, then normal noise sd 0.08, clipped to [0, 1], float16",
        "sam": "stand-in predictor (stand_in_answer), not a network",
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
