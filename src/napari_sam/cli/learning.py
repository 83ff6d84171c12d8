"""``napari-sam train`` and ``napari-sam evaluate``: fine-tuning and measuring quality."""

from __future__ import annotations

import contextlib
import dataclasses
import sys

from . import UsageError

__all__ = ["evaluate", "train"]


def train(args) -> int:
    from ..core.models import resolve_model
    from ..core.outputs import check_file_output
    from ..train import SegmentationDataset, Trainer, TrainingConfig
    from ..train import run as training_run
    from ..train.checkpoints import learned_stain
    from .inputs import training_data
    from .stopping import first_interrupt_stops

    if args.mode == "instance-decoder":
        from .instance_training import train_instance_decoder

        return train_instance_decoder(args)

    # the checkpoint's place is checked before hours of training, not after; an existing one is resumed
    out = check_file_output(args.out, (".pth", ".pt"), "a checkpoint",
                            inputs={"data": args.data, "labels": args.labels, "validation": args.validation},
                            overwrite=None)
    data, channels = training_data(args)
    saved = _saved_training(out) if args.resume and out.exists() else None  # what the resumed run recorded
    if args.validation:
        train, val = data, SegmentationDataset.from_folder(args.validation, pattern=args.pattern, **channels)
    else:
        # a resumed run validates on the split it started with
        seed = int(saved.get("seed") or 0) if saved is not None else args.seed or 0
        train, val = data.split(0.1, seed=seed) if len(data) > 1 else (data, None)
    steps = args.steps if args.steps is not None else 1000
    # only what was given: TrainingConfig holds the defaults
    given = {"mode": args.mode, "learning_rate": args.learning_rate, "box_noise": args.box_noise,
             "central_click_probability": args.central_clicks, "mask_loss_upscale": args.mask_loss_upscale,
             "seed": args.seed}
    chosen = {name: value for name, value in given.items() if value is not None}
    # a short run warms up over a tenth of itself, as a run sized by --minutes does
    warmup = min(TrainingConfig.warmup_steps, max(1, steps // 10))
    config = TrainingConfig(steps=steps, warmup_steps=warmup, **chosen)
    if args.resume and out.exists():
        trainer = Trainer.resume(out, train, val, device=args.device)
        _check_resumed(trainer.config, chosen, args.model, out)
        read = ((saved or {}).get("data") or {}).get("channel")
        if args.channel != read:
            learned = "images without --channel" if read is None else f"--channel {read}"
            raise UsageError(f"{out} learned from {learned}: resume it so, or train a new --out")
        if args.steps is not None:
            trainer.config = dataclasses.replace(trainer.config, steps=args.steps)
    else:
        if out.exists():
            raise FileExistsError(f"{out} exists; pass --resume to continue it, or choose another --out")
        if args.resume:
            print(f"{out} does not exist yet: a new run starts (--resume continues a run saved there)")
        trainer = Trainer(resolve_model(args.model, device=args.device, dtype="float32"), train, config,
                          validation_data=val, device=args.device)
    cfg = trainer.config
    print(f"training on {len(trainer.train_data)} tile(s) of {len(train)} pair(s), validating on "
          f"{len(trainer.validation_data) if trainer.validation_data is not None else 0}; {cfg.mode} mode, "
          f"learning rate {cfg.peak_learning_rate:g}, focal:dice {cfg.focal_weight:g}:{cfg.dice_weight:g}, "
          f"{cfg.corrective_iterations} corrective round(s) (mask prompt {cfg.mask_prompt_probability:g}), "
          f"IoU ranking {cfg.iou_rank_weight:g}, gradient clipping {cfg.grad_clip or 'none'}, "
          f"box jitter {cfg.box_noise:g}, central clicks {cfg.central_click_probability:g}, "
          f"masks judged at {cfg.mask_loss_upscale}x the decoder's grid")
    # --minutes sizes the schedule unless --steps fixes it; then it is only a time limit
    budget = args.minutes if args.minutes and args.steps is None else None
    if budget is None and trainer.step >= cfg.steps:  # a resumed run that is already as long as asked
        print(f"{out} already holds {trainer.step} step(s), as many as --steps {cfg.steps} asks: nothing to train, "
              "the file is left as it is")
        return 0
    if trainer.model.instance_decoder is not None and cfg.mode != "decoder":
        print("the instance decoder (automatic segmentation) is left out: it reads the old encoder's embeddings; "
              "train a new one for the fine-tuned model with --mode instance-decoder")
    advice = trainer.model.metadata.get("stain")
    heads = [name for name, head in (("the instance decoder", trainer.model.instance_decoder),
                                     ("the mask refiner", trainer.model.mask_refiner)) if head is not None]
    if learned_stain(advice, data.channel) != advice and heads:
        print(f"{' and '.join(heads)} left out: learned on stained brightfield read as {advice or 'its colours'}, "
              f"which --channel {args.channel} reads otherwise")
    with first_interrupt_stops("stopping after this step, then saving what was learned "
                                "(Ctrl-C again to quit without saving)") as stopped:
        # saved along the way too, so that a killed run (out of memory, power) resumes from there
        training_run.train(trainer, checkpoint=out, save_every=training_run.SAVE_EVERY, minutes=budget,
                     stop_after=None if budget else args.minutes, stop=stopped.is_set)
    kept = trainer.weights_step
    note = "" if kept is None else f", with the weights of step {kept} (best validation)"
    if kept == 0:
        note = " (no step beat the starting model on validation: its weights are kept)"
    planned = trainer.config.steps  # a time budget sizes the run after it starts
    if stopped.is_set():
        note += f"; stopped before step {planned} (--resume continues it)"
    elif trainer.step < planned:
        note += f"; --minutes ended it before step {planned} (--resume continues it)"
    print(f"saved {out} after {trainer.step} step(s){note}")
    # a cluster script tells a run stopped early (to resume) from a finished one
    return 128 + stopped.signum if stopped.is_set() else 0


def _saved_training(path) -> dict:
    """What a saved run records of its training (its seed, the data it read)."""
    from ..model.checkpoint import read_checkpoint

    try:
        training = read_checkpoint(path).metadata.get("training")
    except (ValueError, TypeError, OSError):  # not a run of ours: resuming it says why in one line
        return {}
    return training if isinstance(training, dict) else {}


def _check_resumed(config, chosen: dict, model: str | None, out) -> None:
    """Refuse options that contradict the run being resumed: it goes on as it started."""
    options = {"mode": "--mode", "learning_rate": "--learning-rate", "box_noise": "--box-noise",
               "central_click_probability": "--central-clicks", "mask_loss_upscale": "--mask-loss-upscale",
               "seed": "--seed"}

    def setting(name: str):
        return config.peak_learning_rate if name == "learning_rate" else getattr(config, name)

    differ = [f"{options[name]} {value}" for name, value in chosen.items() if setting(name) != value]
    if differ:
        raise UsageError(f"{out} is resumed with its own settings; {', '.join(differ)} would change them: "
                         "leave them out, or train a new --out")
    if model is not None:
        print(f"--model {model} is not read: the run continues from the model saved in {out}")


def evaluate(args) -> int:
    """Measure, print the table, and write the report (``--json -``: the report on stdout,
    everything else on stderr, for ``| jq``)."""
    from pathlib import Path

    from ..core.outputs import check_file_output

    if args.json == "-":
        with contextlib.redirect_stdout(sys.stderr):
            results = _measure(args)
        print(_json_text(results))
        return 0
    if args.json:
        check_file_output(args.json, (".json",), "the report", "--json",
                          {"images": args.images, "labels": args.labels}, args.overwrite)
    results = _measure(args)
    if args.json:
        _write_json(Path(args.json).expanduser(), results)
        print(f"wrote {args.json}")
    return 0


def _measure(args) -> list[dict]:
    """Every measurement ``evaluate`` asks for, the table printed; returns the results."""
    import numpy as np

    from .. import evaluate
    from ..evaluate import WatershedBaseline

    pairs = evaluate.load_pairs(args.images, args.labels, pattern=args.pattern)
    stain = args.channel if isinstance(args.channel, str) else None  # how RGB is read: "rgb" or "haematoxylin"
    if stain is not None:
        if not_rgb := next((p for p in pairs if p.image.ndim != p.labels.ndim + 1 or p.image.shape[-1] not in (3, 4)),
                           None):
            raise UsageError(f"--channel {stain} reads RGB images; {not_rgb.name} has shape {not_rgb.image.shape}")
    elif args.channel is not None:
        pairs = [_one_channel(p, args.channel) for p in pairs]
    elif multi := next((p for p in pairs if p.image.ndim == p.labels.ndim + 1 and p.image.shape[-1] not in (3, 4)),
                       None):
        raise UsageError(f"{multi.name} has {multi.image.shape[-1]} channels (shape {multi.image.shape}): choose the "
                         "one to segment with --channel")
    results = []
    methods = []
    model = sam2 = None
    auto = args.auto or args.auto_modes is not None or args.augment
    if args.model:
        from ..core.models import model_family
        from ..core.predictor import Predictor

        if model_family(args.model) == "sam2":  # SAM 2 is measured where it works: propagating through volumes
            from ..core.sam2_models import load_sam2_model

            if auto:
                raise UsageError(f"--auto measures a SAM's automatic modes; {args.model} is a SAM 2, which propagates")
            if stain not in (None, "rgb"):
                raise UsageError(f"--channel {stain}: {args.model} is a SAM 2, which reads RGB as its colours")
            sam2 = load_sam2_model(args.model, device=args.device)
            methods.append((sam2, sam2.source.name if sam2.source is not None else sam2.config.name))
        else:
            from ..core.models import resolve_model

            model = resolve_model(args.model, device=args.device, dtype=args.dtype)
            methods.append((Predictor(model), model.source.name))
    modes = evaluate.select_modes(model, args.auto_modes) if auto else ()  # checked before any work
    if args.augment and "ais" not in modes:
        raise UsageError("--augment measures AIS with test-time augmentation: it needs a model with an instance "
                         "decoder and ais among --auto-modes")
    if stain is not None and not methods:
        raise UsageError(f"--channel {stain} says how a model reads RGB: give --model (the classical baseline keeps "
                         "its own reading: brightfield as its haematoxylin stain, other RGB as the channels' mean)")
    if args.baseline or not methods:
        methods.append((WatershedBaseline(), "watershed baseline"))
    planes = [p for p in pairs if np.asarray(p.labels).ndim == 2]
    volumes = [p for p in pairs if np.asarray(p.labels).ndim == 3]
    if len(planes) + len(volumes) != len(pairs):
        raise ValueError("labels must be 2D planes or 3D (Z, Y, X) volumes")
    if sam2 is not None and not volumes:
        raise UsageError(f"{args.model} is a SAM 2: it is measured on 3D label volumes (propagation), and "
                         f"{args.images} holds 2D planes only")
    if auto and volumes:  # the automatic modes are scored per 2D image; a volume is measured by propagation
        skipped = f"--auto scores 2D label images; the {len(volumes)} 3D volume(s) in {args.images} are measured by " \
                  "propagation only"
        if not planes:
            raise UsageError(skipped + ": give 2D images (e.g. planes of the volume saved one per file) for --auto")
        import warnings

        warnings.warn(skipped, UserWarning, stacklevel=1)
    for method, name in methods:
        sam = not isinstance(method, WatershedBaseline)
        if planes and method is not sam2:
            results.append(evaluate.evaluate_prompted(planes, method, n_corrections=args.corrections,
                                                      max_objects=args.max_objects, seed=args.seed, name=name,
                                                      magnification=args.magnification, diameter=args.diameter,
                                                      channel=stain))
        if volumes:
            # Volumes: each object is propagated from its ground-truth mask on its middle plane.
            if method is sam2:
                propagate = evaluate.sam2_propagator(method)
            elif sam:
                propagate = evaluate.sam_propagator(method.model, magnification=args.magnification, channel=stain)
            else:
                propagate = evaluate.watershed_propagator()
            results.append(evaluate.evaluate_propagation_volumes(propagate, volumes, max_objects=args.max_objects,
                                                                 seed=args.seed, name=f"{name} (propagation)"))
    if auto and planes:
        from ..core.progress_bar import progress_bar

        gen = evaluate.iter_evaluate_modes(planes, model, modes or None, baseline=True, augment=args.augment,
                                           channel=stain)
        with progress_bar(total=len(planes), desc="automatic modes", unit="image") as bar:
            while True:
                try:
                    next(gen)
                except StopIteration as stop:
                    results += stop.value
                    break
                bar.update(1)
    print(evaluate.format_table(results))
    counted = [r["objects"] for r in results if "objects" in r]
    if counted and not any(counted):
        print(f"no object was measured: the labels in {args.labels or args.images} hold none (background is 0, "
              "each object its own id)", file=sys.stderr)
    return results


def _one_channel(pair, channel: int):
    """An evaluation pair whose image is one channel (channels last) of a multichannel image."""
    from ..evaluate import EvalPair

    image = pair.image
    if image.ndim != pair.labels.ndim + 1:
        raise UsageError(f"--channel {channel}: {pair.name} has shape {image.shape} for labels of shape "
                         f"{pair.labels.shape}, no channels last")
    if not 0 <= channel < image.shape[-1]:
        raise UsageError(f"--channel {channel} does not exist: {pair.name} has {image.shape[-1]} channel(s), "
                         f"0 to {image.shape[-1] - 1}")
    return EvalPair(image[..., channel], pair.labels, pair.name)


def _json_text(results) -> str:
    """The results as strict JSON: a score of no objects (NaN) as null."""
    import json
    import math

    def strict(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(v) for v in value]
        return value

    return json.dumps(strict(results), indent=1, allow_nan=False)


def _write_json(path, results) -> None:
    """The report written whole or not at all: a kill mid-write leaves the old file."""
    import os

    text = _json_text(results)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
