"""Train the embedded default model's mask refiner and ship it in the checkpoint.

One command (about 15 minutes on 2 CPU cores; see docs/default_model.md, "Prompted masks
sharpened by the image")::

    .venv/bin/python scripts/train_default_mask_refiner.py --write

prompts every object of the training images through the frozen model as the plugin does
(:func:`napari_sam.train.mask_refiner.collect_mask_samples`), trains the head that
sharpens a prompted mask with the image (:mod:`napari_sam.model.mask_refiner`), prints
the IoU of the masks before and after it on the training images and on the held-out
DSB images (in the model-input frame), and with ``--write`` stores it in ``--model``'s
file beside the SAM weights and the instance decoder (``mask_refiner_state``), with the
provenance in the metadata.

Data (``--sources``, comma-separated): ``fluo`` the first 16 ``dsb2018_fluo`` images (the
default model's own; the last 5 are held out); ``synthetic`` ``--synthetic`` single-channel
planes drawn as the default model's training draws them (nuclei of every size, noise,
inversion); ``em`` every fourth of the default model's EM training planes; ``he`` the 4
``dsb2018_he_brightfield`` images and the 2 CryoNuSeg H&E tiles (MIT), read as their
haematoxylin channel as the model advises (measured and not taken: it halved the gain on
fluorescence). ``--low-light`` makes a share of the synthetic planes dim and noisy. Every
object is sampled with a click, its box and ``--corrections`` corrective clicks. MoNuSeg is
never used (non-commercial licence; evaluation only). Checkpoints and a log go to
``--checkpoint-dir`` (default ``runs/mask_refiner``); a run started again with the same
arguments resumes. The candidates measured so far, and why none ships: docs/default_model.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_default_model as base  # noqa: E402  (data paths, held-out list, float16 storage)

from napari_sam.core.models import load_model  # noqa: E402
from napari_sam.model.checkpoint import read_checkpoint, write_checkpoint  # noqa: E402
from napari_sam.train.mask_refiner import (  # noqa: E402
    MaskRefinerConfig,
    collect_mask_samples,
    mask_refiner_iou,
    save_with_mask_refiner,
    train_mask_refiner,
)


def _files(folders: list[str], names: list[str] | None = None) -> list[tuple]:
    found = []
    for d in folders:
        folder = base.DATA / d
        for name in names if names is not None else sorted(p.name for p in (folder / "images").glob("*.tif")):
            found.append((base._read(folder / "images" / name), base._read(folder / "labels" / name)))
    return found


def _synthetic(count: int, seed: int, low_light: float) -> list[tuple]:
    # Single-channel nuclei at every size the default model's own training drew (radius
    # 4-30 px, a quarter of them big): planes that the refiner must leave as good as
    # SAM made them as well as ones it must mend. The stained-tissue look is dropped,
    # as no haematoxylin plane is ever refined.
    found, i = [], 0
    while len(found) < count:
        rng = np.random.default_rng([seed, 7, i])
        image, labels = base.synthetic_pair(rng, large=i % 4 == 3)
        if np.random.default_rng([seed, 8, i]).random() < low_light:
            image = base.low_light(image, rng)
        i += 1
        if image.ndim == 2 and labels.max() > 0:
            found.append((image, labels))
    return found


def _em() -> list[tuple]:
    # The default model's EM training planes (z 28 and 29 are its validation).
    em = base.DATA / "em_isbi2012_membrane"
    volume, labels = base._read(em / "train_volume.tif"), base._read(em / "train_labels_instances_2d_cc.tif")
    return [(volume[z], labels[z]) for z in range(0, 28, 4)]


SOURCES = {
    "fluo": lambda args: _files(["dsb2018_fluo"], base._DSB_FILES[:16]),
    "he": lambda args: _files(["dsb2018_he_brightfield", "cryonuseg_he_examples"]),
    "synthetic": lambda args: _synthetic(args.synthetic, args.seed, args.low_light),
    "em": lambda args: _em(),
}


def pairs(which: list[str], args) -> list[tuple]:
    return [pair for source in which for pair in SOURCES[source](args)]


def main(argv=None) -> None:
    defaults = MaskRefinerConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(base.ROOT / "src/napari_sam/_models/default.pth"))
    parser.add_argument("--sources", default="fluo", help="comma-separated: " + ", ".join(SOURCES))
    parser.add_argument("--synthetic", type=int, default=60, help="synthetic planes drawn for --sources synthetic")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--depth", type=int, default=defaults.depth)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--corrections", type=int, default=2, help="corrective clicks sampled per object")
    parser.add_argument("--no-augment", action="store_true", help="no flips or quarter turns of the windows")
    parser.add_argument("--low-light", type=float, default=0.5,
                        help="share of the synthetic planes made dim and noisy (contrast to noise 1-3)")
    parser.add_argument("--noise", type=float, default=defaults.noise,
                        help="most Gaussian noise added to a training window, in its standard deviations (0: none)")
    parser.add_argument("--refine-below-magnification", type=float, default=2.0,
                        help="the refiner acts on planes embedded at less than this magnification only (on the "
                        "training images it lost at 2 and more; 0: everywhere)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint-dir", default=str(base.ROOT / "runs/mask_refiner"))
    parser.add_argument("--write", action="store_true", help="store the refiner in --model's file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = MaskRefinerConfig(width=args.width, depth=args.depth, steps=args.steps, seed=args.seed,
                               augment=not args.no_augment, noise=args.noise)
    model = load_model(args.model)
    # the mask chooser that travels with the refiner stays (it ranks SAM's own masks)
    chooser = None if model.mask_refiner is None else model.mask_refiner.chooser
    model.mask_refiner = None  # the samples are SAM's own answers, never an older refiner's
    sources = args.sources.split(",")
    started = time.time()
    train = collect_mask_samples(model, pairs(sources, args), seed=args.seed, corrections=args.corrections)
    held = collect_mask_samples(model, [(base._read(base.DSB_FLUO / "images" / n),
                                         base._read(base.DSB_FLUO / "labels" / n))
                                        for n in base.HELD_OUT["dsb2018_fluo"]], seed=args.seed)
    print(f"{len(train.kind)} training samples, {len(held.kind)} held-out, {time.time() - started:.0f} s")
    log_path = Path(args.checkpoint_dir) / "log.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def log(record: dict) -> None:
        record = dict(record, seconds=round(time.time() - started))
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    refiner = train_mask_refiner(train, config, args.checkpoint_dir, log)
    refiner.chooser = chooser
    figures = {name: {"before": mask_refiner_iou(None, s), "after": mask_refiner_iou(refiner, s)}
               for name, s in (("training", train), ("held-out dsb2018_fluo", held))}
    provenance = {
        "config": asdict(config),
        "sources": sources,
        "synthetic_planes": args.synthetic if "synthetic" in sources else 0,
        "low_light_share": args.low_light,
        "corrections": args.corrections,
        "training_samples": int(len(train.kind)),
        "script": "scripts/train_default_mask_refiner.py",
        "minutes": round((time.time() - started) / 60, 1),
        "torch": str(torch.__version__),
        "threads": args.threads,
        "iou_model_input_frame": figures,
    }
    if args.refine_below_magnification > 0:  # read by napari_sam.core.pixel_heads.refines_masks
        provenance["refine_below_magnification"] = args.refine_below_magnification
    print(json.dumps(provenance, indent=1))
    if args.write:
        output = Path(args.model)
        save_with_mask_refiner(output, refiner, provenance)
        checkpoint = read_checkpoint(output)  # stored as the default model stores its weights
        write_checkpoint(output, base.half_precision(checkpoint.state_dict), checkpoint.metadata,
                         {k: base.half_precision(v) for k, v in checkpoint.extras.items()})
        print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
