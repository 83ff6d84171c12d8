"""``napari-sam train --mode instance-decoder``: an instance decoder for automatic
segmentation (AIS, APG), trained on a model's frozen embeddings of the user's planes.

The run itself is :class:`~napari_sam.train.instance_decoder_run.InstanceDecoderRun`
(the training widget's too); this adds the command's options, progress bar and stops.

The run keeps its state in ``<out>.instance_decoder_run/``: what it was started with
(``run.json``: model, steps, learning rate, seed, channel) and the last and best decoder,
written at every validation. A stopped run (Ctrl-C, a cluster's SIGTERM, or the end of
``--minutes``, which waits for the run's first checkpoint of its own) is saved with its
best decoder so far and ``--resume`` continues it with the settings it started with; a
finished run removes that folder, and so does a run a signal stopped before its first
validation, which has nothing to continue from.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import UsageError

__all__ = ["train_instance_decoder"]

_SAM_ONLY = {"box_noise": "--box-noise", "central_clicks": "--central-clicks",
             "mask_loss_upscale": "--mask-loss-upscale"}


def _settings(args, folder: Path) -> dict:
    """What the run trains with: a new run's from its options, a resumed run's from its
    ``run.json``, where options given again must agree."""
    from ..core.models import default_model_spec
    from ..train.instance_decoder_run import read_run_settings

    # the model a run without --model takes ($NAPARI_SAM_MODEL, else the default), named
    # in run.json so that a resume reads the same one
    given = {"model": args.model or default_model_spec(), "steps": args.steps, "learning_rate": args.learning_rate,
             "seed": args.seed, "channel": args.channel}
    saved = read_run_settings(folder) if args.resume else None
    if saved is None:
        from ..train.instance_decoder import DecoderTrainingConfig
        from ..train.instance_decoder_run import DEFAULT_STEPS

        fresh = {"steps": DEFAULT_STEPS, "learning_rate": DecoderTrainingConfig.learning_rate, "seed": 0}
        return {k: (fresh.get(k) if v is None else v) for k, v in given.items()}
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
    from ..train.instance_decoder_run import InstanceDecoderRun, run_folder, write_run_settings
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
    validation = None
    if args.validation:
        from ..train import SegmentationDataset

        validation = SegmentationDataset.from_folder(args.validation, pattern=args.pattern, **channels)
    problem = InstanceDecoderRun.reading_problem(model, data.channel)
    if problem:
        raise UsageError(f"--channel {args.channel}: {problem}; leave --channel out, or fine-tune the model with it "
                         "first")
    run = InstanceDecoderRun(model, data, out, validation, steps=int(settings["steps"]),
                             learning_rate=float(settings["learning_rate"]), seed=int(settings["seed"]))
    folder.mkdir(parents=True, exist_ok=True)
    write_run_settings(folder, settings)
    config = run.config
    print(f"training an instance decoder on {len(run.train)} tile(s), validating on "
          f"{len(run.validation) if run.validation is not None else 0}; {config.steps} steps, learning rate "
          f"{config.learning_rate:g}; the SAM's weights stay as they are")
    started = time.monotonic()
    steps = run.steps()
    with first_interrupt_stops("stopping after this step, then saving the best decoder so far "
                               "(Ctrl-C again to quit without saving)") as stopped, _progress(config.steps) as bar:
        for report in steps:
            if report.stage == "embed":
                bar.set_description(f"embedding tiles {report.step}/{report.steps}")
            else:
                bar.set_description("instance decoder")
                bar.update(report.step - bar.n)
                if report.validation_loss is not None:
                    bar.set_postfix(loss=f"{report.loss:.3f}", validation=f"{report.validation_loss:.3f}")
            # the time limit ends the run once it has a decoder to save; a signal at once
            out_of_time = args.minutes and time.monotonic() - started > 60 * args.minutes and run.has_decoder_to_save
            if stopped.is_set() or out_of_time:
                steps.close()
                break
    status = 128 + stopped.signum if stopped.is_set() else 0
    if run.save(settings["model"], "napari-sam train --mode instance-decoder") is None:
        print(f"stopped after {run.done} step(s), before the first validation: nothing was saved, nothing is left "
              "to resume; run it again")
        return status
    print(f"saved {out}: the SAM with an instance decoder"
          + ("" if run.best_step is None else f" (the decoder of step {run.best_step}, best on validation)")
          + ("" if run.finished else f"; stopped after step {run.done} of {config.steps} (--resume continues it)")
          + f"; segment everything with --mode ais (or apg): napari-sam segment IMAGE --model {out} --mode ais")
    return status


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="instance decoder", unit="step")
