"""Checkpoints of a training run: the model in the official key format with the
configuration and the training provenance as metadata
(:func:`napari_sam.core.models.load_model` reads them), the optimizer state beside it
(with, after a save in the middle of a run, the best validated weights so far, so that a
resumed run still ends with them), and resuming from both.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from ..model import Sam, config_to_dict
from ..model.atomic_save import save_whole
from ..model.checkpoint import PathLike, read_checkpoint, write_checkpoint
from ..model.decoder_checkpoint import DECODER_KEY, DECODER_MODES
from .config import TrainingConfig
from .dataset import SegmentationDataset

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["CHECKPOINT_FORMAT", "describe_base", "learned_stain", "optimizer_state_path", "resume", "save",
           "stored_weights", "training_metadata"]

CHECKPOINT_FORMAT = 1
"""Version of the metadata layout written by :meth:`Trainer.save`."""

_MAX_HISTORY = 2000  # loss records kept in checkpoint metadata (thinned beyond that)


def optimizer_state_path(checkpoint: PathLike) -> Path:
    """Where :meth:`Trainer.save` keeps the optimizer state of ``checkpoint``."""
    path = Path(checkpoint)
    return path.with_name(path.name + ".optimizer.pt")


def stored_weights(model: Sam, modules: Mapping[str, torch.nn.Module] = {}) -> tuple[dict, dict]:
    """The weights of ``model`` (official keys) and of ``modules`` (extras' key -> module) as
    a checkpoint stores them: floating tensors in float32, except each one still exactly as
    the model's own checkpoint file holds it, which is written back as the file stored it.

    A run that leaves weights as they are (the encoder of a decoder fine-tune, the SAM under
    a new instance decoder) then writes them in the precision they came in: the default
    model's float16 matrices stay float16, rather than doubling the file without adding a bit.

    Returns
    -------
    (state, extras)
        The SAM's state dict, and ``{key: state dict}`` for ``modules``; CPU tensors.
    """
    stored: tuple[dict, dict] = ({}, {})
    if model.source is not None:
        from ..model.model_source import file_stat

        try:  # a file moved or replaced since costs only the saving in size: the values decide
            stored = _half_precision_tensors(str(model.source.path), file_stat(model.source.path))
        except (OSError, ValueError):
            pass

    def kept(state: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]) -> dict:
        out = {}
        for key, value in state.items():
            value = value.detach().cpu()
            if value.is_floating_point():
                value = value.float()
                old = before.get(key)
                if old is not None and old.shape == value.shape and torch.equal(old.float(), value):
                    value = old  # the stored value, bit for bit: nothing lost by keeping its precision
            out[key] = value.contiguous()
        return out

    state = kept(model.state_dict(), stored[0])
    extras = {name: kept(module.state_dict(), stored[1].get(name, {})) for name, module in modules.items()}
    return state, extras


@functools.lru_cache(maxsize=1)
def _half_precision_tensors(path: str, stat) -> tuple[dict, dict]:
    """The 16-bit floating tensors of a checkpoint file (its state dict's, and each extra's
    by key), read once per file version (``stat``): a run saves every few hundred steps, and
    a 2.5 GB ViT-H file, all float32, would be read each time for nothing."""
    checkpoint = read_checkpoint(path)

    def halves(state) -> dict:
        return {k: v.clone() for k, v in state.items()
                if isinstance(v, torch.Tensor) and v.dtype in (torch.float16, torch.bfloat16)}

    return halves(checkpoint.state_dict), {name: halves(extra) for name, extra in checkpoint.extras.items()
                                           if isinstance(extra, Mapping)}


def describe_base(model: Sam) -> dict[str, Any]:
    """Provenance of the model a run starts from: its configuration's name, where its
    weights came from, and the run that trained it, if any."""
    source = model.source
    out: dict[str, Any] = {"config": model.config.name}
    if source is not None:
        out.update(name=source.name, checksum=source.checksum)
    previous = model.metadata.get("training")
    if previous:
        out["fine_tuned"] = {k: previous.get(k) for k in ("mode", "steps", "date", "data")}
    return out


def training_metadata(trainer: Trainer) -> dict[str, Any]:
    """The configuration and training provenance written into checkpoints (see
    :meth:`Trainer.metadata`)."""
    from .. import __version__

    history = trainer.history
    if len(history) > _MAX_HISTORY:
        stride = math.ceil(len(history) / _MAX_HISTORY)
        history = history[::stride] + ([history[-1]] if (len(history) - 1) % stride else [])
    recent = [h["loss"] for h in trainer.history[-20:]]
    return {
        "format": CHECKPOINT_FORMAT,
        "config": config_to_dict(trainer.model.config),
        "training": {
            "mode": trainer.config.mode,
            "steps": trainer.step,
            "seed": trainer.config.seed,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": trainer.config.to_dict(),
            "data": trainer.train_data.describe(),
            "validation_data": None if trainer.validation_data is None else trainer.validation_data.describe(),
            "base_model": trainer.base_model,
            "final_loss": float(np.mean(recent)) if recent else None,
            # the model may hold an earlier step's weights (Trainer.keep_best)
            "weights_from_step": trainer.step if trainer.weights_step is None else trainer.weights_step,
            "best_validation": None if trainer.best is None else {"step": trainer.best[0], "iou": trainer.best[1]},
            "losses": [dict(h) for h in history],
            "device": str(trainer.device),
            "torch": str(torch.__version__),
            "napari_sam": __version__,
        },
    }


def learned_stain(advice: str | None, channel) -> str | None:
    """The stain advice (``metadata["stain"]``) of a model that was advised ``advice`` and
    fine-tuned on planes read through ``channel`` (a channel number, ``"rgb"``,
    ``"haematoxylin"`` or None): what it learned to read is what it will be asked to read.
    Where this differs from ``advice``, :func:`save` leaves out the instance decoder and the
    mask refiner, which learned the other reading."""
    from ..core.stain import HAEMATOXYLIN, RGB

    if channel == HAEMATOXYLIN:  # stained brightfield read as that stain, whatever the base model read
        return HAEMATOXYLIN
    return None if channel == RGB else advice  # the colours, or as the base model reads them


def save(trainer: Trainer, path: PathLike, optimizer: bool = True) -> Path:
    """Write the trainer's model (and optimizer state) to ``path`` (see
    :meth:`Trainer.save`)."""
    path = Path(path)
    meta, heads = trainer.metadata(), {}
    if "scale" in trainer.model.metadata:  # it was trained on the tiles its scale advice gives (inference_tiles)
        meta["scale"] = trainer.model.metadata["scale"]
    stain = learned_stain(trainer.model.metadata.get("stain"), trainer.train_data.channel)
    if stain is not None:  # it learned from stained planes read so (train/features.py)
        meta["stain"] = stain
    # The heads beside the SAM learned from planes read as the base model reads them: where
    # the fine-tune reads stained planes otherwise, they would meet planes they never saw.
    same_reading = stain == trainer.model.metadata.get("stain")
    decoder = trainer.model.instance_decoder
    if decoder is not None and trainer.config.mode == "decoder" and same_reading:
        # the encoder did not change, so the instance decoder still reads its embeddings
        heads[DECODER_KEY] = decoder
        for key in ("instance_decoder", "automatic"):
            if key in trainer.model.metadata:
                meta[key] = trainer.model.metadata[key]
    elif "automatic" in trainer.model.metadata:
        # Without the decoder its modes and their settings go; the grid's thresholds and the
        # box detector are the SAM's and the images' and still apply.
        advice = {k: v for k, v in trainer.model.metadata["automatic"].items() if k in ("mode", "detector", "grid")}
        if advice.get("mode") in DECODER_MODES:
            # a detector the model recommends stands in; without one, the package's own choice
            if "detector" in advice:
                advice["mode"] = "boxes"
            else:
                del advice["mode"]
        meta["automatic"] = advice
    refiner = trainer.model.mask_refiner
    if refiner is not None and same_reading:  # it reads logits and pixels, not the embedding: any fine-tune's
        from ..model.mask_refiner import MASK_REFINER_KEY

        if refiner.chooser is not None:
            # The chooser ranks masks by the IoU head's values among others, and the run has
            # trained both: the fine-tuned model picks by its own head.
            from ..model.mask_chooser import CHOOSER_PREFIX
            from ..model.mask_refiner import mask_refiner_from_state_dict

            refiner = mask_refiner_from_state_dict({k: v for k, v in refiner.state_dict().items()
                                                    if not k.startswith(CHOOSER_PREFIX)})
        heads[MASK_REFINER_KEY] = refiner
        if "mask_refiner" in trainer.model.metadata:  # where it acts (core.pixel_heads.refines_masks)
            meta["mask_refiner"] = trainer.model.metadata["mask_refiner"]
    # Floating tensors go out as float32 whatever precision the encoder ran in (loaders cast
    # as they need), but those the run left as they were keep their file's precision.
    state, extras = stored_weights(trainer.model, heads)
    write_checkpoint(path, state, meta, extras=extras or None)
    if optimizer:
        resumable = {"optimizer": trainer.optimizer.state_dict(), "step": trainer.step,
                     "param_names": trainer.param_names}
        if trainer.best is not None and trainer.best_state is not None and meta["training"]["weights_from_step"] \
                != trainer.best[0]:
            # a save in the middle of a run holds its current weights: the best so far go beside
            # them, so that a run killed after it still ends with them
            resumable["best"] = {"step": trainer.best[0], "iou": trainer.best[1], "state": trainer.best_state}
        save_whole(resumable, optimizer_state_path(path))
    return path


def resume(
    cls: type[Trainer],
    path: PathLike,
    train_data: SegmentationDataset,
    validation_data: SegmentationDataset | None = None,
    config: TrainingConfig | None = None,
    device: str | torch.device | None = None,
) -> Trainer:
    """A ``cls`` trainer continuing the run saved at ``path`` (see :meth:`Trainer.resume`)."""
    from ..core.models import load_model

    checkpoint = read_checkpoint(path)
    meta = checkpoint.metadata
    training = meta.get("training")
    if not isinstance(training, Mapping) or "steps" not in training:
        raise ValueError(f"{os.fspath(path)} was not written by a Trainer: it holds no training metadata to resume")
    # load_model reads the configuration the file records and attaches what it carries
    # beside the SAM (the instance decoder, a mask refiner), which the resumed run keeps.
    model = load_model(path, device="cpu", dtype="float32")
    if config is None:
        settings = dict(training["settings"])
        # runs written before tiling was a setting trained on whole planes
        settings.setdefault("native_tiles", False)
        # and before first clicks could open in the inner half, drew them anywhere
        settings.setdefault("central_click_probability", 0.0)
        config = TrainingConfig.from_dict(settings)
    trainer = cls(model, train_data, config, validation_data, device)
    trainer.step = int(training["steps"])
    trainer.history = [dict(h) for h in training.get("losses", [])]
    if "base_model" in training:
        trainer.base_model = dict(training["base_model"])
    best = training.get("best_validation")
    if isinstance(best, Mapping) and training.get("weights_from_step") == best.get("step"):
        # the file holds the best weights so far: a resumed run must beat them to replace them
        trainer.remember_best(int(best["step"]), float(best["iou"]))

    state_file = optimizer_state_path(path)
    problem, state = "", None
    if not state_file.is_file():
        problem = f"no optimizer state at {state_file}"
    else:
        try:  # a file beside the checkpoint, as untrusted as it: damaged, it costs the moments only
            state = torch.load(state_file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch has many errors for a damaged file
            problem = f"the optimizer state at {state_file} cannot be read ({' '.join(str(err).split())[:120]})"
    if state is not None and (not isinstance(state, Mapping) or state.get("param_names") != trainer.param_names
                              or state.get("step") != trainer.step):
        problem = f"the optimizer state at {state_file} belongs to other trainable parameters or another step"
    if not problem:
        try:
            trainer.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, TypeError, ValueError) as err:  # a file of the right name and another make
            problem = f"the optimizer state at {state_file} is not AdamW's for these parameters ({err})"
    if problem:
        warnings.warn(f"{problem}: training resumes with fresh AdamW moments", UserWarning, stacklevel=3)
        return trainer
    kept = state.get("best")
    if trainer.best is None and isinstance(best, Mapping) and _fits(kept, best.get("step"), trainer):
        trainer.remember_best(int(best["step"]), float(best["iou"]), dict(kept["state"]))
    return trainer


def _fits(kept, step, trainer: Trainer) -> bool:
    """Whether best weights kept beside a save are the recorded best step's, for these parameters."""
    if not isinstance(kept, Mapping) or kept.get("step") != step or not isinstance(kept.get("state"), Mapping):
        return False
    named = dict(trainer.model.named_parameters())
    return set(kept["state"]) == set(trainer.param_names) and all(
        isinstance(v, torch.Tensor) and v.shape == named[n].shape for n, v in kept["state"].items())
