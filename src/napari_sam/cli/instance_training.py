"""``napari-sam train --mode instance-decoder``: an instance decoder for automatic
segmentation (AIS, APG), trained on a model's frozen embeddings of the user's planes.

A fine-tune of the whole model leaves its instance decoder out (the decoder read the old
encoder's embeddings), and SAM's and most other checkpoints never had one; this gives
either one, as micro-sam's trainer does. The SAM weights are written back unchanged, with
the decoder beside them (:func:`~napari_sam.train.instance_decoder.save_with_instance_decoder`).

The run keeps its state in ``<out>.instance_decoder_run/``: what it was started with
(``run.json``: model, steps, learning rate, seed, channel) and the last and best decoder,
written at every validation. A stopped run (Ctrl-C, a cluster's SIGTERM, the end of
``--minutes``) is saved with its best decoder so far and ``--resume`` continues it with
the settings it started with; a finished run removes that folder, and so does a run
stopped before its first validation, which has nothing to continue from.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from . import UsageError

__all__ = ["DEFAULT_STEPS", "run_folder", "train_instance_decoder"]

DEFAULT_STEPS = 3000
"""Decoder steps of a run without ``--steps`` (the default model's took 4000, 14 minutes
on a 2-core CPU)."""

_SAM_ONLY = {"box_noise": "--box-noise", "central_clicks": "--central-clicks",
             "mask_loss_upscale": "--mask-loss-upscale"}
_RUN = "run.json"


def run_folder(out: Path) -> Path:
    """Where a run writing ``out`` keeps its state until it finishes."""
    return out.with_name(out.name + ".instance_decoder_run")


def _settings(args, folder: Path) -> dict:
    """What the run trains with: a new run's from its options, a resumed run's from its
    ``run.json``, where options given again must agree."""
    from ..core.models import default_model_spec

    # the model a run without --model takes ($NAPARI_SAM_MODEL, else the default), named
    # in run.json so that a resume reads the same one
    given = {"model": args.model or default_model_spec(), "steps": args.steps, "learning_rate": args.learning_rate,
             "seed": args.seed, "channel": args.channel}
    if not args.resume or not (folder / _RUN).is_file():
        from ..train.instance_decoder import DecoderTrainingConfig

        fresh = {"steps": DEFAULT_STEPS, "learning_rate": DecoderTrainingConfig.learning_rate, "seed": 0}
        return {k: (fresh.get(k) if v is None else v) for k, v in given.items()}
    saved = json.loads((folder / _RUN).read_text())
    options = {"model": "--model", "steps": "--steps", "learning_rate": "--learning-rate", "seed": "--seed",
               "channel": "--channel"}
    differ = [f"{options[k]} {v}" for k, v in given.items()
              if (v is not None if k != "model" else args.model is not None) and saved.get(k) != v]
    if differ:
        raise UsageError(f"the stopped run in {folder} goes on as it started ({', '.join(differ)} would change it): "
                         "leave them out, or train a new --out")
    return saved


def train_instance_decoder(args) -> int:
    """Train, save, and say what was saved; the exit status (0, or 128 + the signal that
    stopped the run)."""
    from ..core.models import resolve_model
    from ..core.outputs import check_file_output
    from ..train.checkpoints import learned_stain
    from ..train.instance_decoder import DecoderTrainingConfig, iter_train_instance_decoder, save_with_instance_decoder
    from ..train.tiles import inference_tiles
    from .inputs import training_data
    from .stopping import first_interrupt_stops

    given = [option for name, option in _SAM_ONLY.items() if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: settings of the SAM's prompted training, which --mode "
                         "instance-decoder does not do")
    out = check_file_output(args.out, (".pth", ".pt"), "a checkpoint",
                            inputs={"data": args.data, "labels": args.labels, "validation": args.validation},
                            overwrite=None)
    folder = run_folder(out)
    if out.exists() and not args.resume:
        raise FileExistsError(f"{out} exists; pass --resume to continue it, or choose another --out")
    if args.resume and out.exists() and not folder.is_dir():
        print(f"{out} has no stopped instance-decoder run beside it ({folder.name}): nothing to resume, the file is "
              "left as it is")
        return 0
    if not args.resume and folder.exists():
        raise UsageError(f"{folder} holds a stopped run: pass --resume to continue it, or remove it")
    settings = _settings(args, folder)
    args.channel = settings["channel"]
    data, channels = training_data(args)
    model = resolve_model(settings["model"], device=args.device, dtype="float32")
    advice = model.metadata.get("stain")
    if learned_stain(advice, data.channel) != advice:
        raise UsageError(f"--channel {args.channel}: the instance decoder reads the image as the model reads it "
                         f"({'its haematoxylin stain' if advice else 'the colours'} for stained RGB); leave "
                         "--channel out, or fine-tune the model with it first")
    if args.validation:
        from ..train import SegmentationDataset

        train, val = data, SegmentationDataset.from_folder(args.validation, pattern=args.pattern, **channels)
    else:
        # whole planes validate: tiles of one plane overlap, and would validate on what trained
        train, val = data.split(0.1, seed=settings["seed"]) if len(data) > 1 else (data, None)
    # AIS reads this decoder's maps from embeddings at the plane's own scale (auto.modes.reads_native_scale)
    train = inference_tiles(train, model.config.image_size, magnification=1.0)
    val = None if val is None else inference_tiles(val, model.config.image_size, magnification=1.0)
    steps = int(settings["steps"])
    config = DecoderTrainingConfig(steps=steps, learning_rate=float(settings["learning_rate"]),
                                   seed=int(settings["seed"]), warmup_steps=min(100, max(1, steps // 10)),
                                   validate_every=min(250, max(1, steps // 10)))
    folder.mkdir(parents=True, exist_ok=True)
    _write_settings(folder / _RUN, settings)
    print(f"training an instance decoder on {len(train)} tile(s), validating on "
          f"{len(val) if val is not None else 0}; {config.steps} steps, learning rate {config.learning_rate:g}; "
          "the SAM's weights stay as they are")
    run = iter_train_instance_decoder(model, train, val, config, folder)
    decoder, done, best_step, finished = None, 0, None, False
    started = time.monotonic()
    with first_interrupt_stops("stopping after this step, then saving the best decoder so far "
                               "(Ctrl-C again to quit without saving)") as stopped, _progress(config.steps) as bar:
        while True:
            try:
                report = next(run)
            except StopIteration as end:
                decoder, finished = end.value, True
                break
            if report.stage == "embed":
                bar.set_description(f"embedding tiles {report.step}/{report.steps}")
            else:
                bar.set_description("instance decoder")
                bar.update(report.step - bar.n)
                done = report.step
                if report.validation_loss is not None:
                    bar.set_postfix(loss=f"{report.loss:.3f}", validation=f"{report.validation_loss:.3f}")
                best_step = report.best_step if report.best_step is not None else best_step
            if stopped.is_set() or (args.minutes and time.monotonic() - started > 60 * args.minutes):
                run.close()  # the state of the last validation stays in the run folder
                break
    status = 128 + stopped.signum if stopped.is_set() else 0
    if decoder is None:
        decoder = _saved_decoder(folder, config, model)
        if decoder is None:
            shutil.rmtree(folder, ignore_errors=True)
            print(f"stopped after {done} step(s), before the first validation: nothing was saved, nothing is left "
                  "to resume; run it again")
            return status
    automatic = {k: v for k, v in (model.metadata.get("automatic") or {}).items() if k in ("detector", "grid")}
    provenance = {"command": "napari-sam train --mode instance-decoder", "model": settings["model"],
                  "config": config.as_dict(), "data": train.describe(),
                  "validation": None if val is None else val.describe(),
                  "steps": config.steps if finished else done, "best_step": best_step,
                  "date": time.strftime("%Y-%m-%d %H:%M:%S"), "scale_matched": False}
    # the tuned AIS and APG settings of an earlier decoder go: micro-sam's suit a new one
    save_with_instance_decoder(model, decoder, out, provenance, dict(automatic, mode="ais"))
    if finished:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"saved {out}: the SAM with an instance decoder"
          + ("" if best_step is None else f" (the decoder of step {best_step}, best on validation)")
          + ("" if finished else f"; stopped after step {done} of {config.steps} (--resume continues it)")
          + f"; segment everything with --mode ais (or apg): napari-sam segment IMAGE --model {out} --mode ais")
    return status


def _write_settings(path: Path, settings: dict) -> None:
    # whole or absent: a resume reads what the run started with
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(settings))
    os.replace(tmp, path)


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="instance decoder", unit="step")


def _saved_decoder(folder: Path, config, model):
    """The best (else the last) decoder a stopped run's folder holds; None before its
    first validation."""
    import torch

    from ..model.instance_decoder import InstanceDecoder
    from ..train.instance_decoder import BEST, LAST

    for name in (BEST, LAST):
        path = folder / name
        if path.is_file():
            state = torch.load(path, map_location=model.device, weights_only=True)
            decoder = InstanceDecoder(config.decoder_config(model.config.prompt_embed_dim)).to(model.device)
            decoder.load_state_dict(state["decoder"])
            return decoder.eval()
    return None
