"""At what magnification should a model embed a plane? A measurement per image.

For every image of the sets below, one click and one box on up to ``--max-objects``
objects, answered at each magnification of ``--magnifications`` (tiles of
``image_size / m`` plane pixels, enlarged to the model input; see
``napari_sam.core.scale``), next to the objects' median diameter (ground truth) and the
diameter :func:`~napari_sam.core.scale.estimate_diameter` reads from the image.

The object diameter the model segments best, in model-input pixels, is fitted on the
``fit`` sets only (images the default model was trained on): for each image, the best
magnification times its median diameter; the median of those. The rule "magnification
= that diameter / the estimated diameter", rounded to ``MAGNIFICATIONS``, is then
measured on the ``held-out`` sets beside magnification 1 (and on ``eval-only`` sets,
which no model here is trained on)::

    .venv/bin/python scripts/scale_study.py --json docs/results/scale_study.json

Prints a table per image and a summary per set and rule.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import tifffile
from skimage.measure import regionprops

from napari_sam.core.models import load_model
from napari_sam.core.predictor import Predictor
from napari_sam.core.scale import MAGNIFICATIONS, estimate_diameter
from napari_sam.evaluate.prompted import evaluate_prompted

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _dsb(first: int | None, last: int | None):
    files = sorted((DATA / "dsb2018_fluo" / "images").glob("*.tif"))
    return [(p, DATA / "dsb2018_fluo" / "labels" / p.name) for p in files[first:last]]


def _folder(name: str, limit: int | None = None):
    files = sorted((DATA / name / "images").glob("*.tif"))[:limit]
    return [(p, DATA / name / "labels" / p.name) for p in files]


def image_sets(monuseg: int) -> dict[str, tuple[str, list]]:
    """set name -> (role, [(image path, labels path)])."""
    sd = DATA / "stardist_bundled"
    return {
        "dsb2018_fluo first 16": ("fit", _dsb(None, -5)),
        "dsb2018_he_brightfield": ("fit", _folder("dsb2018_he_brightfield")),
        "cryonuseg_he_examples": ("fit", _folder("cryonuseg_he_examples")),
        "dsb2018_fluo last 5": ("held-out", _dsb(-5, None)),
        "stardist img2d": ("held-out", [(sd / "img2d.tif", sd / "mask2d.tif")]),
        "stardist img2d_small": ("held-out", [(sd / "img2d_small.tif", sd / "mask2d_small.tif")]),
        f"monuseg2018_he first {monuseg}": ("eval-only", _folder("monuseg2018_he", monuseg)),
    }


def median_diameter(labels: np.ndarray) -> float:
    return float(np.median([r.equivalent_diameter_area for r in regionprops(labels) if r.area >= 16]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--magnifications", default="1,1.5,2,3")
    parser.add_argument("--max-objects", type=int, default=40)
    parser.add_argument("--monuseg", type=int, default=6, help="MoNuSeg tiles measured (evaluation only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    model = load_model(args.model)
    predictor = Predictor(model)
    mags = [float(m) for m in args.magnifications.split(",")]
    rows = []
    for set_name, (role, pairs) in image_sets(args.monuseg).items():
        for image_path, labels_path in pairs:
            image, labels = tifffile.imread(image_path), tifffile.imread(labels_path).astype(np.int32)
            row = {"set": set_name, "role": role, "image": image_path.stem[:16], "shape": list(image.shape),
                   "diameter": median_diameter(labels), "estimate": estimate_diameter(image), "by_magnification": {}}
            for m in mags:
                r = evaluate_prompted([(image, labels)], predictor, n_corrections=0, max_objects=args.max_objects,
                                      seed=args.seed, min_area=16, magnification=m)
                row["by_magnification"][str(m)] = {"point": r["point"], "box": r["box"], "objects": r["objects"]}
            rows.append(row)
            cells = "  ".join(f"{m:g}: {v['point']:.3f}/{v['box']:.3f}" for m, v in
                              ((float(k), v) for k, v in row["by_magnification"].items()))
            est = f"{row['estimate']:.1f}" if row["estimate"] else "-"
            print(f"{set_name:24s} {row['image']:16s} diameter {row['diameter']:5.1f} estimate {est:>5s}  {cells}",
                  flush=True)

    def score(v):
        return v["point"] + v["box"]

    fit = [r for r in rows if r["role"] == "fit"]
    wanted = []
    for r in fit:
        best = max(r["by_magnification"], key=lambda k: score(r["by_magnification"][k]))
        wanted.append(float(best) * r["diameter"])
    preferred = float(np.median(wanted))
    print(f"\npreferred object diameter (fit sets, median of best magnification x diameter): {preferred:.1f} px")

    def nearest(ratio: float) -> float:
        allowed = [m for m in MAGNIFICATIONS if mags[0] <= m <= mags[-1]]
        return min(allowed, key=lambda m: abs(math.log(m / ratio)))

    summary = {}
    for set_name in dict.fromkeys(r["set"] for r in rows):
        subset = [r for r in rows if r["set"] == set_name]
        out = {}
        for rule in ["1.0", "best fixed", "auto (estimate)", "oracle (true diameter)"]:
            pts, bxs = [], []
            for r in subset:
                if rule == "auto (estimate)":
                    m = nearest(preferred / r["estimate"]) if r["estimate"] else 1.0
                elif rule == "oracle (true diameter)":
                    m = nearest(preferred / r["diameter"])
                elif rule == "best fixed":
                    m = max(mags, key=lambda k: sum(score(x["by_magnification"][str(k)]) for x in fit))
                else:
                    m = 1.0
                key = str(m) if str(m) in r["by_magnification"] else None
                if key is None:  # a rounded choice not measured: take the nearest measured
                    key = str(min(mags, key=lambda k: abs(math.log(k / m))))
                v = r["by_magnification"][key]
                pts += [v["point"]] * v["objects"]
                bxs += [v["box"]] * v["objects"]
            out[rule] = {"point": float(np.mean(pts)), "box": float(np.mean(bxs)), "objects": len(pts)}
        summary[set_name] = {"role": subset[0]["role"]} | out
        print(f"{set_name:26s} ({subset[0]['role']}, {out['1.0']['objects']} objects)  " + "  ".join(
            f"{k}: {v['point']:.3f}/{v['box']:.3f}" for k, v in out.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": args.model, "magnifications": mags, "max_objects": args.max_objects, "seed": args.seed,
             "preferred_diameter": preferred, "images": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
