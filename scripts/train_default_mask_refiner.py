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

Data: the first 16 ``dsb2018_fluo`` images (the default model's own; the last 5 are held
out); ``--sources fluo,he`` adds the 4 ``dsb2018_he_brightfield`` images and the 2
CryoNuSeg H&E tiles (MIT), read as their haematoxylin channel as the model advises (measured
and not taken: it halved the gain on fluorescence). Every object is sampled with a click,
its box and ``--corrections`` corrective clicks. MoNuSeg is never used (non-commercial
licence; evaluation only). Checkpoints and a log go to
``--checkpoint-dir`` (default ``runs/mask_refiner``); a run started again with the same
arguments resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

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

SOURCES = {
    "fluo": lambda: [(base.DSB_FLUO, name) for name in base._DSB_FILES[:16]],
    "he": lambda: [(base.DATA / d, p.name) for d in ("dsb2018_he_brightfield", "cryonuseg_he_examples")
                   for p in sorted((base.DATA / d / "images").glob("*.tif"))],
}


def pairs(which: list[str]) -> list[tuple]:
    return [(base._read(folder / "images" / name), base._read(folder / "labels" / name))
            for source in which for folder, name in SOURCES[source]()]


def main(argv=None) -> None:
    defaults = MaskRefinerConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(base.ROOT / "src/napari_sam/_models/default.pth"))
    parser.add_argument("--sources", default="fluo", help="comma-separated: fluo, he")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--depth", type=int, default=defaults.depth)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--corrections", type=int, default=2, help="corrective clicks sampled per object")
    parser.add_argument("--no-augment", action="store_true", help="no flips or quarter turns of the windows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint-dir", default=str(base.ROOT / "runs/mask_refiner"))
    parser.add_argument("--write", action="store_true", help="store the refiner in --model's file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = MaskRefinerConfig(width=args.width, depth=args.depth, steps=args.steps, seed=args.seed,
                               augment=not args.no_augment)
    model = load_model(args.model)
    model.mask_refiner = None  # the samples are SAM's own answers, never an older refiner's
    sources = args.sources.split(",")
    started = time.time()
    train = collect_mask_samples(model, pairs(sources), seed=args.seed, corrections=args.corrections)
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
    figures = {name: {"before": mask_refiner_iou(None, s), "after": mask_refiner_iou(refiner, s)}
               for name, s in (("training", train), ("held-out dsb2018_fluo", held))}
    provenance = {
        "config": asdict(config),
        "sources": sources,
        "corrections": args.corrections,
        "training_samples": int(len(train.kind)),
        "script": "scripts/train_default_mask_refiner.py",
        "minutes": round((time.time() - started) / 60, 1),
        "torch": str(torch.__version__),
        "threads": args.threads,
        "iou_model_input_frame": figures,
    }
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
