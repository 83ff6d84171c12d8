"""Training an instance decoder for AIS on a frozen SAM's image embeddings.

The decoder (:mod:`napari_sam.model.instance_decoder`) reads nothing but the image
embedding, so with the encoder frozen every training plane is embedded once and the run
only ever computes the decoder: minutes on a CPU. Targets are the per-object distance
maps of :mod:`~napari_sam.train.instance_targets`; the loss is micro-sam's (torch-em's
``DiceBasedDistanceLoss``): a Dice loss on the foreground plus Dice losses on both
distance maps, counted inside objects only.

Planes go through the same preparation as at inference (:func:`prepare_plane`: the
longest side to the model input), and the decoder's maps through the same resizing
(:meth:`InstanceDecoder.resize`) back to the plane, so a decoder trained on tiles of the
model input's size sees at inference what it saw here.

Runs are resumable: every ``validate_every`` steps the decoder, the optimizer and the step
are written to ``checkpoint_dir`` (atomically), and the decoder with the lowest validation
loss is kept apart; a new run with the same directory and settings continues from there.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.image_embedding import ImageEmbedding
from ..core.preprocess import Normalization, prepare_plane
from ..core.stain import plane_channel
from ..model import Sam
from ..model.atomic_save import save_whole
from ..model.instance_decoder import InstanceDecoder, InstanceDecoderConfig
from .dataset import SegmentationDataset
from .instance_targets import instance_targets

__all__ = ["DecoderTrainingConfig", "DecoderTrainingProgress", "distance_dice_loss", "iter_train_instance_decoder",
           "save_with_instance_decoder"]

LAST, BEST = "instance_decoder_last.pt", "instance_decoder_best.pt"


@dataclass(frozen=True)
class DecoderTrainingConfig:
    """Settings of :func:`iter_train_instance_decoder`.

    Parameters
    ----------
    steps, batch_size
        Optimiser steps, and planes per step (drawn at random, with replacement).
    learning_rate, weight_decay, warmup_steps
        AdamW; the rate rises linearly over ``warmup_steps``, then follows a cosine down to
        2 % of its peak at the last step.
    initial_features, scale, transposed
        The decoder's shape (:class:`~napari_sam.model.instance_decoder.InstanceDecoderConfig`).
    validate_every
        Steps between validations and checkpoints.
    seed
        Fixes the initial weights and each step's draw (a resumed run draws what the
        uninterrupted run would have).
    normalization
        Intensity mapping of the planes (as at inference).
    """

    steps: int = 3000
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    initial_features: int = 16
    scale: int = 4
    transposed: bool = True
    validate_every: int = 250
    seed: int = 0
    normalization: Normalization = field(default_factory=Normalization)

    def __post_init__(self):
        for name in ("steps", "batch_size", "validate_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, not {self.learning_rate}")

    def decoder_config(self, embed_dim: int = 256) -> InstanceDecoderConfig:
        return InstanceDecoderConfig(embed_dim=embed_dim, initial_features=self.initial_features,
                                     transposed=self.transposed, scale=self.scale)

    def as_dict(self) -> dict:
        """Plain JSON types, for checkpoint metadata."""
        out = dataclasses.asdict(self)
        out["normalization"] = dataclasses.asdict(self.normalization)
        return out


@dataclass(frozen=True)
class DecoderTrainingProgress:
    """One step done: its training loss, and the validation loss when it validated.

    Before the first step, planes are embedded in batches: reports of ``stage="embed"``
    count planes in ``step``/``steps`` (``loss`` is NaN).
    """

    step: int
    steps: int
    loss: float
    validation_loss: float | None = None
    best_step: int | None = None
    stage: str = "train"


def distance_dice_loss(maps: torch.Tensor, targets: torch.Tensor, eps: float = 1e-6,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """micro-sam's decoder loss: Dice on the foreground, plus Dice on each distance map
    with both prediction and target zeroed outside the target's objects.

    Parameters
    ----------
    maps, targets
        (B, 3, H, W) in [0, 1]: foreground, centre distances, boundary distances.
    weights
        (B, 1, H, W) non-negative pixel weights for every sum of the Dice (None: all 1),
        e.g. :func:`~napari_sam.train.instance_targets.contact_band` to make the lines
        between touching objects count.

    Returns
    -------
    torch.Tensor
        Scalar: the sum of the three Dice losses (each over the whole batch), in [0, 3].
    """
    if maps.shape != targets.shape or maps.dim() != 4 or maps.shape[1] != 3:
        raise ValueError(f"maps {tuple(maps.shape)} and targets {tuple(targets.shape)} must both be (B, 3, H, W)")
    inside = targets[:, :1]
    pred = torch.cat([maps[:, :1], maps[:, 1:] * inside], dim=1)
    true = torch.cat([targets[:, :1], targets[:, 1:] * inside], dim=1)
    dims = (0, 2, 3)
    w = 1 if weights is None else weights
    overlap = (w * pred * true).sum(dims)
    total = (w * (pred * pred + true * true)).sum(dims)
    return (1 - 2 * overlap / total.clamp_min(eps)).sum()


class EncodedPlanes:
    """Embeddings (CPU, float32) and targets (uint8, 1/255 steps) of a dataset's planes,
    each computed when first drawn; with ``keep_inputs`` instead of the targets each
    plane's model input (its channel mean, float16) and labels, in :attr:`inputs` (an
    image refiner's data)."""

    def __init__(self, model: Sam, data: SegmentationDataset, normalization: Normalization,
                 keep_inputs: bool = False):
        self.model, self.data, self.normalization = model, data, normalization
        self.cache: dict[int, tuple[ImageEmbedding, np.ndarray]] = {}
        self.inputs: dict[int, tuple[torch.Tensor, np.ndarray]] | None = {} if keep_inputs else None

    def __len__(self) -> int:
        return len(self.data)

    def fill(self, batch_size: int = 16) -> Generator[int, None, None]:
        """Embed every plane not yet embedded, ``batch_size`` at a time (much faster than
        one by one); yields the number of planes ready after each batch."""
        missing = [i for i in range(len(self.data)) if i not in self.cache]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            pairs = [self.data[i] for i in chunk]
            axis = self.data.channel_axis
            prepared = [prepare_plane(p.image, self.normalization, axis,
                                      plane_channel(self.model, p.image, axis, self.data.channel),
                                      long_side=self.model.config.image_size) for p in pairs]
            model = self.model
            with torch.no_grad():
                # Model.embed, with each plane padded to the square input first so they stack.
                inputs = torch.cat([model.preprocess(x.float().to(model.device)) for x, _ in prepared])
                features = model.image_encoder(inputs.to(model.encoder_dtype)).float().cpu()
            for j, (i, pair, (x, original)) in enumerate(zip(chunk, pairs, prepared)):
                emb = ImageEmbedding(features[j : j + 1].clone(), (int(x.shape[-2]), int(x.shape[-1])), original)
                if self.inputs is None:
                    self.cache[i] = (emb, np.round(instance_targets(pair.labels) * 255).astype(np.uint8))
                else:  # a refiner's targets are made in the model input frame, from the labels
                    self.cache[i] = (emb, np.empty(0, np.uint8))
                    self.inputs[i] = (inputs[j].mean(0, keepdim=True).half().cpu(), np.asarray(pair.labels))
            yield len(self.data) - len(missing) + start + len(chunk)

    def get(self, index: int) -> tuple[ImageEmbedding, torch.Tensor]:
        if index not in self.cache:
            for _ in self.fill():
                pass
        emb, targets = self.cache[index]
        return emb, torch.from_numpy(targets).float().div_(255)


def _batch_loss(decoder: InstanceDecoder, planes: EncodedPlanes, indices, device) -> torch.Tensor:
    embs, targets = zip(*(planes.get(int(i)) for i in indices))
    maps = decoder.maps(torch.cat([e.features for e in embs]).to(device))
    side = planes.model.config.image_size
    preds = [decoder.resize(maps[j : j + 1], e.input_size, e.original_size, side) for j, e in enumerate(embs)]
    if all(p.shape == preds[0].shape for p in preds):
        return distance_dice_loss(torch.cat(preds), torch.stack(targets).to(device))
    # Planes of different sizes: the loss per plane, averaged.
    return torch.stack([distance_dice_loss(p, t[None].to(device)) for p, t in zip(preds, targets)]).mean()


def rate_factor(config: DecoderTrainingConfig, step: int) -> float:
    """The learning rate at ``step`` as a factor of the peak: linear warm-up, then cosine
    decay to 2 % (what ``LambdaLR`` takes)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(step - config.warmup_steps, span) / span))




def _load_run(path: Path, device) -> dict:
    """A run's own checkpoint, read as untrusted (tensors and plain values only)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch has many errors for a damaged file
        raise ValueError(f"{path} cannot be read ({' '.join(str(err).split())[:120]}): delete it (the run's last "
                         "state: the run starts again; its best weights: they are forgotten), or use another "
                         "checkpoint_dir") from None


class ResumableRun:
    """The bookkeeping of a resumable run that trains ``module`` alone: where it stands
    (read back from ``folder`` when a run of the same ``config`` left checkpoints there),
    the best validation loss and weights so far, and the checkpoints it writes.

    ``names`` are the (last, best) file names, ``key`` the module's entry in them.
    """

    def __init__(self, folder, names: tuple[str, str], key: str, module, optimizer, scheduler, config: dict, device):
        self.folder = Path(folder) if folder is not None else None
        self.last, self.best, self.key = names[0], names[1], key
        self.module, self.optimizer, self.scheduler, self.config = module, optimizer, scheduler, config
        self.start, self.best_loss, self.best_step, self.best_state = 0, math.inf, None, None
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        last = self.folder / self.last
        if last.is_file():
            state = _load_run(last, device)
            if state.get("config") != config:
                raise ValueError(f"{last} was written with other settings; use another checkpoint_dir")
            module.load_state_dict(state[key])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            self.start, self.best_step = int(state["step"]), state["best_step"]
            self.best_loss = float(state["best_loss"])
        if (self.folder / self.best).is_file():
            self.best_state = _load_run(self.folder / self.best, device)[key]

    def checkpoint(self, done: int, val_loss: float | None) -> None:
        """After a validation (``val_loss`` None without a validation set): keep the best
        weights and write both checkpoints (atomically)."""
        if val_loss is not None and val_loss < self.best_loss:
            self.best_loss, self.best_step = val_loss, done
            self.best_state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            if self.folder is not None:
                save_whole({self.key: self.best_state, "step": done, "loss": val_loss}, self.folder / self.best)
        if self.folder is not None:
            save_whole({
                self.key: self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": done, "best_loss": self.best_loss,
                "best_step": self.best_step, "config": self.config}, self.folder / self.last)

    def steps(self, config, groups, step_loss, validate) -> Generator[DecoderTrainingProgress, None, None]:
        """The loop both trainers share: ``groups`` (training, then validation data, None
        for none) filled with progress reports, then the steps from where the run stands,
        ``step_loss(rng)`` drawing each step's batch from ``rng`` (fixed by the seed and the
        step, so a resumed run draws what the uninterrupted one would), ``validate()`` (or
        None) every ``config.validate_every`` steps; ends with the best weights in place."""
        if self.start < config.steps:
            total, offset = sum(len(g) for g in groups if g is not None), 0
            for group in (g for g in groups if g is not None):
                for ready in group.fill():
                    yield DecoderTrainingProgress(offset + ready, total, math.nan, stage="embed")
                offset += len(group)
        for step in range(self.start, config.steps):
            loss = step_loss(np.random.default_rng([config.seed, step]))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            done, val_loss = step + 1, None
            if done % config.validate_every == 0 or done == config.steps:
                val_loss = validate() if validate is not None else None
                self.checkpoint(done, val_loss)
            yield DecoderTrainingProgress(done, config.steps, float(loss.detach()), val_loss, self.best_step)
        if self.best_state is not None:
            self.module.load_state_dict(self.best_state)


def _validate(decoder: InstanceDecoder, planes: EncodedPlanes, batch_size: int, device) -> float:
    decoder.eval()
    losses, weights = [], []
    with torch.no_grad():
        for start in range(0, len(planes), batch_size):
            chunk = range(start, min(start + batch_size, len(planes)))
            losses.append(float(_batch_loss(decoder, planes, chunk, device)))
            weights.append(len(chunk))
    decoder.train()
    return float(np.average(losses, weights=weights))


def iter_train_instance_decoder(
    model: Sam,
    train: SegmentationDataset,
    validation: SegmentationDataset | None = None,
    config: DecoderTrainingConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> Generator[DecoderTrainingProgress, None, InstanceDecoder]:
    """Train an instance decoder on the frozen ``model``'s embeddings of ``train``.

    Parameters
    ----------
    model
        The SAM whose image encoder the decoder will read (left unchanged).
    train, validation
        2D planes with instance labels (:class:`SegmentationDataset`); without a validation
        set the last step's decoder is returned.
    config
        :class:`DecoderTrainingConfig`.
    checkpoint_dir
        Where the run's checkpoints go; a run finding a checkpoint of the same settings
        there resumes from it (a finished run returns at once).

    Yields
    ------
    DecoderTrainingProgress
        After each step; closing the generator stops the run (the last checkpoint stays).

    Returns
    -------
    InstanceDecoder
        Through ``StopIteration.value``: the decoder with the lowest validation loss, in
        eval mode, on the model's device.
    """
    config = config or DecoderTrainingConfig()
    if len(train) == 0:
        raise ValueError("the training set is empty")
    device = model.device
    torch.manual_seed(config.seed)
    decoder = InstanceDecoder(config.decoder_config(model.config.prompt_embed_dim)).to(device).train()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: rate_factor(config, step))
    run = ResumableRun(checkpoint_dir, (LAST, BEST), "decoder", decoder, optimizer, scheduler, config.as_dict(), device)
    planes = EncodedPlanes(model, train, config.normalization)
    val_planes = EncodedPlanes(model, validation, config.normalization) if validation else None
    yield from run.steps(
        config, (planes, val_planes),
        lambda rng: _batch_loss(decoder, planes, rng.integers(len(planes), size=config.batch_size), device),
        None if val_planes is None else lambda: _validate(decoder, val_planes, config.batch_size, device))
    return decoder.eval()


def save_with_instance_decoder(
    model: Sam, decoder: InstanceDecoder, path: str | os.PathLike, provenance: dict | None = None,
    advice: dict | None = None,
) -> Path:
    """Write ``model`` with ``decoder`` beside it, as micro-sam stores its decoders.

    The SAM weights go under the official keys (float32, or as the model's own file stored
    them where they still hold its values: :func:`~napari_sam.train.checkpoints.stored_weights`),
    the decoder under ``"decoder_state"`` (the model's mask refiner, if any, under ``"mask_refiner_state"``);
    :func:`~napari_sam.core.models.load_model` gives it back as :attr:`Sam.instance_decoder`.
    The model's metadata is kept, with ``provenance`` (plain JSON types) under
    ``"instance_decoder"`` and, when given, ``advice`` as its ``"automatic"`` entry
    (:func:`napari_sam.auto.recommended`). Written atomically.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    from ..model.checkpoint import write_checkpoint
    from ..model.decoder_checkpoint import DECODER_KEY
    from .checkpoints import stored_weights

    meta = dict(model.metadata)
    if provenance is not None:
        meta["instance_decoder"] = provenance
    if advice is not None:
        meta["automatic"] = advice
    heads: dict[str, torch.nn.Module] = {DECODER_KEY: decoder}
    if model.mask_refiner is not None:  # the prompted masks' head stays with the model
        from ..model.mask_refiner import MASK_REFINER_KEY

        heads[MASK_REFINER_KEY] = model.mask_refiner
    state, extras = stored_weights(model, heads)
    write_checkpoint(path, state, meta, extras=extras)
    return Path(path)
