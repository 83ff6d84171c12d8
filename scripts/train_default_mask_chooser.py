"""Train the embedded default model's mask chooser and ship it in the checkpoint.

One command (about 40 minutes on 2 CPU cores; docs/default_model.md, "A lone click's mask
chosen by looking")::

    .venv/bin/python scripts/train_default_mask_chooser.py --write

clicks every object of the training planes through the frozen model
(:func:`napari_sam.train.mask_chooser.collect_chooser_samples`), trains the head that
chooses among a lone click's three masks (:mod:`napari_sam.model.mask_chooser`), prints the
IoU of the masks the IoU head and the chooser pick on the validation and held-out planes (in
the model-input frame), and with ``--write`` stores it in ``--model``'s file with the mask
refiner (``mask_refiner_state``, keys ``chooser.*``), its provenance in
``metadata["mask_chooser"]``.

Training planes (three clicks per object: the deepest pixel and two of the inner half): the
first 13 ``dsb2018_fluo`` images, the 4 ``dsb2018_he_brightfield`` images and the CryoNuSeg
tile ``TCGA-DE-A4MA`` (read as their haematoxylin stain, as the model advises), every fourth
EM training plane, 240 synthetic single-channel planes, and 320 more synthetic planes: dim
and noisy ones (``low_light``) and stained ones. Validation (one click at the deepest
pixel): ``dsb2018_fluo`` images 14-16, the CryoNuSeg tile ``TCGA-S4-A8RO`` and 60 more
synthetic planes. Held out, only measured: the default model's held-out planes. MoNuSeg is
never used (non-commercial licence).
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
import train_default_mask_refiner as refiner_script  # noqa: E402  (the refiner's training planes)
import train_default_model as base  # noqa: E402  (data paths, held-out list, float16 storage)

from napari_sam.core.models import load_model  # noqa: E402
from napari_sam.model.checkpoint import read_checkpoint, write_checkpoint  # noqa: E402
from napari_sam.model.mask_refiner import MASK_REFINER_KEY  # noqa: E402
from napari_sam.train.mask_chooser import (  # noqa: E402
    MaskChooserConfig,
    chooser_pick_iou,
    collect_chooser_samples,
    train_mask_chooser,
)


def _dim_and_stained(count: int = 240, stained: int = 80) -> list[tuple]:
    # Dim, noisy planes like deep 3D stacks (where the IoU head picks a bright grain of a
    # faint nucleus), and stained ones (H&E is otherwise 5 images).
    found, i = [], 0
    while len(found) < count:
        rng = np.random.default_rng([5, 7, i])
        i += 1
        image, labels = base.synthetic_pair(rng, large=i % 4 == 3)
        if labels.max() == 0 or (image.ndim == 2 and i % 3 == 0):
            continue
        found.append((base.low_light(image, rng) if image.ndim == 2 else image, labels))
    j = 0
    while j < 4000 and len(found) < count + stained:
        rng = np.random.default_rng([6, 7, j])
        j += 1
        image, labels = base.synthetic_pair(rng, large=j % 4 == 3)
        if image.ndim == 3 and labels.max() > 0:
            found.append((image, labels))
    return found


def main(argv=None) -> None:
    defaults = MaskChooserConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(base.ROOT / "src/napari_sam/_models/default.pth"))
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="store the chooser in --model's file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = MaskChooserConfig(steps=args.steps, seed=args.seed)
    model = load_model(args.model)
    if model.mask_refiner is None:
        raise SystemExit(f"{args.model} has no mask refiner to keep the chooser beside")
    started = time.time()

    def progress(done: int, of: int, samples: int) -> None:
        print(f"  {done}/{of} planes, {samples} samples, {time.time() - started:.0f} s", flush=True)

    he = (refiner_script._files(["dsb2018_he_brightfield"])
          + refiner_script._files(["cryonuseg_he_examples"], ["TCGA-DE-A4MA.tif"]))
    first = (refiner_script._files(["dsb2018_fluo"], base._DSB_FILES[:13]) + he + refiner_script._em()
             + refiner_script._synthetic(240, 0, 0.0))
    train = collect_chooser_samples(model, first, clicks=3, seed=0, progress=progress)
    train = train + collect_chooser_samples(model, _dim_and_stained(), clicks=3, seed=5, progress=progress)
    validation = collect_chooser_samples(
        model, refiner_script._files(["dsb2018_fluo"], base._DSB_FILES[13:16])
        + refiner_script._files(["cryonuseg_he_examples"], ["TCGA-S4-A8RO.tif"])
        + refiner_script._synthetic(300, 0, 0.0)[240:], clicks=1, seed=1)
    held: dict[str, list] = {}
    for name, image, labels in base.held_out_planes():
        held.setdefault(name, []).append((image, labels))
    held_samples = {name: collect_chooser_samples(model, planes, seed=2) for name, planes in held.items()}
    print(f"{len(train)} training samples, {len(validation)} validation, {time.time() - started:.0f} s")

    def log(record: dict) -> None:
        print(json.dumps(dict(record, seconds=round(time.time() - started))), flush=True)

    chooser = train_mask_chooser(train, validation, config, log)
    figures = {name: {"iou_head": round(chooser_pick_iou(None, s), 4),
                      "chooser": round(chooser_pick_iou(chooser, s), 4),
                      "best_of_three": round(float(s.true.max(1).mean()), 4), "clicks": len(s)}
               for name, s in [("validation", validation), *held_samples.items()]}
    provenance = {
        "config": asdict(config),
        "training_samples": len(train),
        "script": "scripts/train_default_mask_chooser.py",
        "minutes": round((time.time() - started) / 60, 1),
        "torch": str(torch.__version__),
        "threads": args.threads,
        "pick_iou_model_input_frame": figures,
    }
    print(json.dumps(provenance, indent=1))
    if args.write:
        output = Path(args.model)
        refiner = model.mask_refiner
        refiner.chooser = chooser
        checkpoint = read_checkpoint(output)
        extras = dict(checkpoint.extras)
        extras[MASK_REFINER_KEY] = base.half_precision({k: v.detach().float().cpu()
                                                        for k, v in refiner.state_dict().items()})
        write_checkpoint(output, checkpoint.state_dict, dict(checkpoint.metadata, mask_chooser=provenance), extras)
        print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
