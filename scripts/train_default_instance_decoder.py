"""Train the embedded default model's instance decoder (AIS) and ship it in the checkpoint.

One command (about 15-25 minutes on 2 CPU cores; see docs/automatic.md)::

    .venv/bin/python scripts/train_default_instance_decoder.py --write

trains a decoder on the frozen default model's embeddings with the package's trainer
(:func:`napari_sam.train.iter_train_instance_decoder`) and, with ``--write``, stores it in
``--model``'s file (``src/napari_sam/_models/default.pth`` for the default) as micro-sam
stores its decoders (a ``decoder_state`` entry beside the SAM weights, whose values stay
as they are; the whole file is then stored with its matrices in float16), with the
provenance in the metadata and AIS as the recommended automatic mode.

Data: the default model's own training data (scripts/train_default_model.py's
``build_datasets`` with the same seed: synthetic nuclei and crops of the real data in
../shared/data, never the held-out images) plus crops of the two CryoNuSeg H&E example
tiles (MIT). MoNuSeg is never used (non-commercial licence; evaluation only).
Checkpoints and a log go to ``--checkpoint-dir`` (default ``runs/instance_decoder``): an
interrupted run started again with the same arguments resumes; a folder that holds a run
on another model or other data is refused.

``--refiner`` then trains the decoder's image refiner (:mod:`napari_sam.model.image_refiner`,
:func:`napari_sam.train.iter_train_image_refiner`) on the same data, the model and its
decoder frozen, and stores the decoder with it; its defaults are the shipped refiner's
(12000 steps, width 16, depth 5: about 25 minutes)::

    .venv/bin/python scripts/train_default_instance_decoder.py --refiner --write
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_default_model as base  # noqa: E402  (the default model's own data recipe)

from napari_sam.core.models import load_model  # noqa: E402
from napari_sam.model.checkpoint import read_checkpoint, write_checkpoint  # noqa: E402
from napari_sam.train import SegmentationDataset  # noqa: E402
from napari_sam.train.image_refiner import RefinerTrainingConfig, iter_train_image_refiner  # noqa: E402
from napari_sam.train.instance_decoder import (  # noqa: E402
    DecoderTrainingConfig,
    iter_train_instance_decoder,
    save_with_instance_decoder,
)

MAX_BYTES = 25_000_000
# AIS post-processing for this decoder, chosen on six DSB *training* images (every third of
# the first 16) over centre 0.5/0.7/0.9 x boundary 0.5-0.8 x foreground 0.5-0.7 thresholds;
# the rest micro-sam's defaults. min_size 25 drops the specks a 4-pixel decoder leaves.
AIS_ADVICE = {"boundary_distance_threshold": 0.6, "min_size": 25}
# Planes read as their haematoxylin stain (H&E): chosen on the six H&E training images
# (docs/automatic.md, "H&E: smoothing that follows the nuclei's size").
AIS_STAINED_ADVICE = {"boundary_distance_threshold": 0.7, "foreground_threshold": 0.4,
                      "distance_smoothing_per_diameter": 0.143}
CRYONUSEG = base.DATA / "cryonuseg_he_examples"


def datasets(seed: int, n_synthetic: int, n_large: int, n_validation: int, crops: int, scale_matched: bool = False,
             crop_factor: int = 1):
    """(training, validation): the default model's recipe plus CryoNuSeg H&E crops.

    ``scale_matched``: real crops enlarged as inference enlarges their planes
    (``base.scale_matched_zoom``), so that AIS can read the embeddings the prompts use;
    the CryoNuSeg tiles come with ``build_datasets``' 15 crops each then."""
    if scale_matched:
        train, validation = base.build_datasets(seed, n_synthetic, n_validation, n_large, None, True)
        description = dict(train.description, source="scripts/train_default_instance_decoder.py")
        return SegmentationDataset(list(train._loaders), list(train.names), description), validation
    train, validation = base.build_datasets(seed, n_synthetic, n_validation, n_large, crop_factor=crop_factor)
    loaders, names = list(train._loaders), list(train.names)
    if CRYONUSEG.is_dir():
        for s, path in enumerate(sorted((CRYONUSEG / "images").glob("*.tif"))):
            image, labels = base._read(path), base._read(CRYONUSEG / "labels" / path.name)
            for c in range(crops):
                loaders.append(lambda image=image, labels=labels, s=s, c=c: base._augmented_crop(
                    image, labels, np.random.default_rng([seed, 5, s, c])))
                names.append(f"cryonuseg_he_examples/{path.name} crop {c}")
    description = dict(train.description, cryonuseg_crops=crops, source="scripts/train_default_instance_decoder.py")
    return SegmentationDataset(loaders, names, description), validation


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="default 3000 (12000 with --refiner)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 planes (16 crops with --refiner)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--features", type=int, default=16, help="decoder width (initial_features)")
    parser.add_argument("--scale", type=int, default=4, help="decoder output pixels per token (4, 8 or 16)")
    parser.add_argument("--synthetic", type=int, default=600, help="synthetic training images")
    parser.add_argument("--large", type=int, default=100, help="synthetic images of few large objects")
    parser.add_argument("--validation", type=int, default=40, help="synthetic validation images")
    parser.add_argument("--cryonuseg-crops", type=int, default=15)
    parser.add_argument("--crop-factor", type=int, default=1,
                        help="draw this many times the default model's crops of each real training plane")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint-dir", default=None,
                        help="default runs/instance_decoder (runs/image_refiner with --refiner)")
    parser.add_argument("--scale-matched", action="store_true",
                        help="real crops enlarged as the scale advice enlarges their planes; AIS then reads the "
                        "prompts' (magnified) embeddings")
    parser.add_argument("--model", default="default",
                        help="the SAM whose embeddings it reads (default: the shipped one)")
    parser.add_argument("--refiner", action="store_true",
                        help="train an image refiner for --model's instance decoder (both frozen) instead of a decoder")
    parser.add_argument("--refine-width", type=int, default=16, help="the refiner's hidden channels")
    parser.add_argument("--refine-depth", type=int, default=5, help="the refiner's 3x3 layers after the image's")
    parser.add_argument("--crop", type=int, default=96, help="refiner training crops, model input pixels")
    parser.add_argument("--contact-weight", type=float, default=0.0,
                        help="refiner loss: weight 1 + W along the lines where objects touch (0: none)")
    parser.add_argument("--write", action="store_true",
                        help="store the decoder in --model's checkpoint (the shipped file for the default)")
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm

    output = base.OUTPUT if args.model == "default" else Path(args.model)
    if args.write and not output.is_file():
        parser.error(f"--write stores the decoder in the model's own file; {args.model} is not a checkpoint file")
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu", dtype="float32")
    train, validation = datasets(args.seed, args.synthetic, args.large, args.validation, args.cryonuseg_crops,
                                 args.scale_matched, args.crop_factor)
    if args.checkpoint_dir is None:
        args.checkpoint_dir = str(base.ROOT / "runs" / ("image_refiner" if args.refiner else "instance_decoder"))
    if args.refiner:
        args.steps, args.batch_size = args.steps or 12000, args.batch_size or 16
        config = RefinerTrainingConfig(steps=args.steps, batch_size=args.batch_size, crop=args.crop,
                                       width=args.refine_width, depth=args.refine_depth,
                                       contact_weight=args.contact_weight, learning_rate=args.lr, seed=args.seed)
    else:
        args.steps, args.batch_size = args.steps or 3000, args.batch_size or 8
        config = DecoderTrainingConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                                       initial_features=args.features, scale=args.scale, seed=args.seed)
    folder = Path(args.checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _same_run_or_exit(folder, {
        # the trainer's resume checks only its own settings; embeddings of another model
        # or other crops would make a resumed (or already finished) decoder wrong
        "model": model.source.checksum,
        "scale_matched": bool(args.scale_matched),
        "data": [args.seed, args.synthetic, args.large, args.validation, args.cryonuseg_crops]
        + ([args.crop_factor] if args.crop_factor != 1 else []),
        **({"refiner": True} if args.refiner else {}),
    })
    log = open(folder / "log.jsonl", "a")
    started = time.time()
    what = "image refiner" if args.refiner else "instance decoder"
    train_run = iter_train_image_refiner if args.refiner else iter_train_instance_decoder
    run = train_run(model, train, validation, config, folder)
    with tqdm(total=config.steps, desc=what) as bar:
        while True:
            try:
                p = next(run)
            except StopIteration as stop:
                decoder = stop.value
                break
            if p.stage == "embed":
                bar.set_description(f"embedding planes {p.step}/{p.steps}")
                bar.refresh()
                continue
            bar.set_description(what)
            bar.n = p.step
            bar.set_postfix(loss=f"{p.loss:.3f}")
            bar.refresh()
            if p.validation_loss is not None:
                record = {"step": p.step, "loss": p.loss, "validation_loss": p.validation_loss,
                          "best_step": p.best_step, "seconds": round(time.time() - started, 1)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                tqdm.write(json.dumps(record))
    minutes = (time.time() - started) / 60
    provenance = {
        "command": "scripts/train_default_instance_decoder.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": config.as_dict(),
        "training_data": {k: v for k, v in train.description.items() if k != "real_planes"},
        "training_planes": len(train),
        "validation": validation.description,
        "minutes_this_run": round(minutes, 1),
        "torch": str(torch.__version__),
        "threads": args.threads,
        # read by napari_sam.auto.modes.reads_native_scale
        "scale_matched": bool(args.scale_matched),
    }
    if args.refiner:  # the decoder's own provenance stays; the refiner's goes beside it
        provenance = dict(model.metadata.get("instance_decoder") or {}, image_refiner=provenance)
    print(json.dumps(provenance, indent=1))
    if args.write:
        advice = dict(base.AUTOMATIC_ADVICE, mode="ais", ais=AIS_ADVICE, ais_stained=AIS_STAINED_ADVICE)
        save_with_instance_decoder(model, decoder, output, provenance, advice)
        # stored as the default model stores its weights: matrices in float16
        checkpoint = read_checkpoint(output)
        write_checkpoint(output, base.half_precision(checkpoint.state_dict), checkpoint.metadata,
                         {k: base.half_precision(v) for k, v in checkpoint.extras.items()})
        size = output.stat().st_size
        print(f"wrote {output} ({size / 1e6:.1f} MB)")
        if size > MAX_BYTES:
            raise SystemExit(f"{output} is {size} bytes, over the {MAX_BYTES} limit")


def _same_run_or_exit(folder: Path, identity: dict) -> None:
    """Record what the run in ``folder`` trains on, or refuse a folder of another run."""
    record = folder / "run.json"
    if record.is_file():
        if json.loads(record.read_text()) != identity:
            raise SystemExit(f"{folder} holds a run on another model or other data (its run.json): "
                             "give another --checkpoint-dir or delete that folder")
        return
    if any(folder.iterdir()):
        raise SystemExit(f"{folder} holds files of a run that did not record its model: "
                         "give another --checkpoint-dir or delete that folder")
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(identity))
    tmp.replace(record)


if __name__ == "__main__":
    main()
