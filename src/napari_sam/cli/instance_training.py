"""``napari-sam train --mode instance-decoder``: an instance decoder for automatic
segmentation (AIS, APG), trained on a model's frozen embeddings of the user's planes.

A fine-tune of the whole model leaves its instance decoder out (the decoder read the old
encoder's embeddings), and SAM's and most other checkpoints never had one; this gives
either one, as micro-sam's trainer does. The SAM weights are written back unchanged, with
the decoder beside them (:func:`~napari_sam.train.instance_decoder.save_with_instance_decoder`).

The run keeps its state in ``<out>.instance_decoder_run/`` (the last and the best decoder,
written at every validation), so a stopped run (Ctrl-C, a cluster's SIGTERM, the end of
``--minutes``) is saved with its best decoder so far and ``--resume`` continues it; a
finished run removes that folder.
"""

from __future__ import annotations

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


def run_folder(out: Path) -> Path:
    """Where a run writing ``out`` keeps its state until it finishes."""
    return out.with_name(out.name + ".instance_decoder_run")


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
        print(f"{out} finished its run already (no {folder.name} beside it): the file is left as it is")
        return 0
    if not args.resume and folder.exists():
        raise UsageError(f"{folder} holds a stopped run: pass --resume to continue it, or remove it")
    data, channels = training_data(args)
    model = resolve_model(args.model, device=args.device, dtype="float32")
    advice = model.metadata.get("stain")
    if learned_stain(advice, data.channel) != advice:
        raise UsageError(f"--channel {args.channel}: the instance decoder reads the image as the model reads it "
                         f"({'its haematoxylin stain' if advice else 'the colours'} for stained RGB); leave "
                         "--channel out, or fine-tune the model with it first")
    # AIS reads this decoder's maps from embeddings at the plane's own scale (auto.modes.reads_native_scale)
    tiles = inference_tiles(data, model.config.image_size, magnification=1.0)
    if args.validation:
        from ..train import SegmentationDataset

        validation = inference_tiles(SegmentationDataset.from_folder(args.validation, pattern=args.pattern,
                                                                     **channels), model.config.image_size)
        train = tiles
    elif len(tiles) > 1:
        train, validation = tiles.split(0.1, seed=args.seed or 0)
    else:
        train, validation = tiles, None
    options = {"steps": args.steps or DEFAULT_STEPS, "seed": args.seed or 0}
    if args.learning_rate is not None:
        options["learning_rate"] = args.learning_rate
    config = DecoderTrainingConfig(**options, validate_every=min(250, max(1, (args.steps or DEFAULT_STEPS) // 10)))
    print(f"training an instance decoder on {len(train)} tile(s), validating on "
          f"{len(validation) if validation is not None else 0}; {config.steps} steps, learning rate "
          f"{config.learning_rate:g}; the SAM's weights stay as they are")
    run = iter_train_instance_decoder(model, train, validation, config, folder)
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
                continue
            bar.set_description("instance decoder")
            bar.update(report.step - bar.n)
            done = report.step
            if report.validation_loss is not None:
                bar.set_postfix(loss=f"{report.loss:.3f}", validation=f"{report.validation_loss:.3f}")
            best_step = report.best_step if report.best_step is not None else best_step
            if stopped.is_set() or (args.minutes and time.monotonic() - started > 60 * args.minutes):
                run.close()  # the state of the last validation stays in the run folder
                break
    if decoder is None:
        decoder = _best_so_far(run_folder(out), config, model)
        if decoder is None:
            print(f"stopped after {done} step(s), before the first validation: nothing saved; --resume continues "
                  f"from {folder}")
            return 128 + stopped.signum if stopped.is_set() else 0
    automatic = {k: v for k, v in (model.metadata.get("automatic") or {}).items() if k in ("detector", "grid")}
    provenance = {"command": "napari-sam train --mode instance-decoder", "config": config.as_dict(),
                  "data": train.describe(), "validation": None if validation is None else validation.describe(),
                  "steps": config.steps if finished else done, "best_step": best_step,
                  "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "scale_matched": False}
    save_with_instance_decoder(model, decoder, out, provenance, dict(automatic, mode="ais"))
    if finished:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"saved {out}: the SAM with an instance decoder"
          + ("" if best_step is None else f" (the decoder of step {best_step}, best on validation)")
          + ("" if finished else f"; stopped after step {done} of {config.steps} (--resume continues it)")
          + f"; segment everything with --mode ais (or apg): napari-sam segment IMAGE --model {out} --mode ais")
    return 128 + stopped.signum if stopped.is_set() else 0


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="instance decoder", unit="step")


def _best_so_far(folder: Path, config, model):
    """The best decoder a stopped run's folder holds (None before the first validation)."""
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
