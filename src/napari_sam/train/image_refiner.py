"""Training an image refiner (:mod:`napari_sam.model.image_refiner`) on a frozen model
and a frozen instance decoder.

The decoder's last features and logits depend on the embedding alone, so each training
plane is embedded and decoded once; the run then only computes the refiner, on random
crops of the model input frame (``crop`` pixels, aligned with the decoder's grid), which
is where it works: a refiner is a stack of local convolutions, so crops teach it what
whole inputs would, at a fraction of the cost. Targets are the per-object distance maps
of :mod:`~napari_sam.train.instance_targets` computed on the labels brought to the model
input frame (nearest neighbour), the loss micro-sam's (:func:`distance_dice_loss`), its
pixels weighted along the lines where objects touch when ``contact_weight`` is set
(:func:`~napari_sam.train.instance_targets.contact_band`).

Runs are resumable like :func:`~napari_sam.train.instance_decoder.iter_train_instance_decoder`'s:
every ``validate_every`` steps the refiner, the optimizer and the step go to
``checkpoint_dir`` (atomically), the refiner with the lowest validation loss (on whole
validation planes) apart.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Generator
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.preprocess import Normalization
from ..model import Sam
from ..model.image_refiner import DEPTH
from ..model.instance_decoder import UPSCALE, InstanceDecoder
from .dataset import SegmentationDataset
from .instance_decoder import DecoderTrainingProgress, EncodedPlanes, ResumableRun, distance_dice_loss, rate_factor
from .instance_targets import contact_band, instance_targets

__all__ = ["RefinerTrainingConfig", "iter_train_image_refiner"]

LAST, BEST = "image_refiner_last.pt", "image_refiner_best.pt"


@dataclass(frozen=True)
class RefinerTrainingConfig:
    """Settings of :func:`iter_train_image_refiner`.

    Parameters
    ----------
    steps, batch_size, crop
        Optimiser steps; crops per step (planes drawn at random, with replacement); crop
        side in model input pixels (rounded down to the decoder's grid).
    width, depth
        The refiner's hidden channels and 3x3 layers (``refine_width``, ``refine_depth``).
    contact_weight
        ``w`` in the loss's pixel weights ``1 + w * contact_band(labels)`` (training and
        validation); 0: every pixel counts alike, micro-sam's loss.
    learning_rate, weight_decay, warmup_steps
        AdamW with a linear warm-up and a cosine down to 2 % of the peak.
    validate_every, seed, normalization
        As for :class:`~napari_sam.train.instance_decoder.DecoderTrainingConfig`.
    """

    steps: int = 1500
    batch_size: int = 16
    crop: int = 96
    width: int = 24
    depth: int = DEPTH
    contact_weight: float = 0.0
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    validate_every: int = 250
    seed: int = 0
    normalization: Normalization = field(default_factory=Normalization)

    def __post_init__(self):
        for name in ("steps", "batch_size", "crop", "width", "depth", "validate_every"):
            if int(getattr(self, name)) < (least := 2 if name == "depth" else 1):
                raise ValueError(f"{name} must be at least {least}, not {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, not {self.learning_rate}")
        if not (np.isfinite(self.contact_weight) and self.contact_weight >= 0):
            raise ValueError(f"contact_weight must be a number of at least 0, not {self.contact_weight}")

    def as_dict(self) -> dict:
        """Plain JSON types, for checkpoint metadata."""
        out = dataclasses.asdict(self)
        out["normalization"] = dataclasses.asdict(self.normalization)
        return out


def _frame_labels(labels: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """Labels brought to the model input frame (rows, cols = ``input_size``): the label at
    the centre of each input pixel, by nearest neighbour, as the input's pixels came from
    the plane's by resizing."""
    rows, cols = input_size
    r = (2 * np.arange(rows) + 1) * labels.shape[0] // (2 * rows)
    c = (2 * np.arange(cols) + 1) * labels.shape[1] // (2 * cols)
    return labels[np.ix_(r, c)]


class _Frames:
    """Per plane: the frozen decoder's features and logits (float16), the model input
    (grey, float16) and the targets (uint8, 1/255 steps; with ``contact``, the contact
    band as a fourth channel), all in the model input frame."""

    def __init__(self, model: Sam, decoder: InstanceDecoder, data: SegmentationDataset, normalization: Normalization,
                 contact: bool = False):
        self.side = int(model.config.image_size)
        self.contact = contact
        self.planes = EncodedPlanes(model, data, normalization, keep_inputs=True)
        self.decoder = decoder
        self.items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]] = []

    def __len__(self) -> int:
        return len(self.planes)

    def fill(self) -> Generator[int, None, None]:
        for ready in self.planes.fill():
            yield ready
        device = next(self.decoder.parameters()).device
        for i in range(len(self.planes)):
            emb, _ = self.planes.cache.pop(i)
            image, labels = self.planes.inputs.pop(i)
            with torch.no_grad():
                features, logits = self.decoder.head(emb.features.to(device))
            targets = np.zeros((4 if self.contact else 3, self.side, self.side), np.uint8)
            rows, cols = emb.input_size
            framed = _frame_labels(labels, (rows, cols))
            targets[:3, :rows, :cols] = np.round(instance_targets(framed) * 255)
            if self.contact:
                targets[3, :rows, :cols] = np.round(contact_band(framed) * 255)
            self.items.append((features[0].half().cpu(), logits[0].half().cpu(), image, torch.from_numpy(targets),
                               (rows, cols)))

    def crops(self, indices, crop: int, rng: np.random.Generator):
        """A batch of (features, logits, image, targets) crops, float32."""
        factor = UPSCALE // self.decoder.config.scale
        crop = max(factor, min(self.side, crop) // factor * factor)
        out = []
        for i in indices:
            features, logits, image, targets, (rows, cols) = self.items[int(i)]
            r0, c0 = (factor * int(rng.integers(0, max(1, (n - crop) // factor + 1))) for n in (rows, cols))
            r0, c0 = min(r0, self.side - crop), min(c0, self.side - crop)
            coarse = np.s_[:, r0 // factor:(r0 + crop) // factor, c0 // factor:(c0 + crop) // factor]
            fine = np.s_[:, r0:r0 + crop, c0:c0 + crop]
            out.append((features[coarse], logits[coarse], image[fine], targets[fine]))
        features, logits, image, targets = (torch.stack(t).float() for t in zip(*out))
        return features, logits, image, targets / 255

    def whole(self, indices):
        features, logits, image, targets = (torch.stack([self.items[int(i)][k] for i in indices]).float()
                                            for k in range(4))
        return features, logits, image, targets / 255


def _loss(decoder: InstanceDecoder, batch, device, contact_weight: float) -> torch.Tensor:
    features, logits, image, targets = (t.to(device) for t in batch)
    # The refiner reads the channel mean of the 3-channel input: a grey input repeated.
    maps = torch.sigmoid(decoder.refine(features, logits, image.expand(-1, 3, -1, -1)))
    weights = 1 + contact_weight * targets[:, 3:] if contact_weight else None
    return distance_dice_loss(maps, targets[:, :3], weights=weights)


def iter_train_image_refiner(
    model: Sam,
    train: SegmentationDataset,
    validation: SegmentationDataset | None = None,
    config: RefinerTrainingConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> Generator[DecoderTrainingProgress, None, InstanceDecoder]:
    """Train an image refiner for ``model``'s instance decoder, both frozen.

    Parameters
    ----------
    model
        A SAM with an instance decoder without a refiner (:attr:`Sam.instance_decoder`);
        neither is changed.
    train, validation
        2D planes with instance labels; without a validation set the last step's refiner
        is kept.
    config
        :class:`RefinerTrainingConfig`.
    checkpoint_dir
        Where the run's checkpoints go; a run finding one of the same settings resumes.

    Yields
    ------
    DecoderTrainingProgress
        ``stage="embed"`` while planes are embedded, then one per step.

    Returns
    -------
    InstanceDecoder
        Through ``StopIteration.value``: a copy of the decoder with the best refiner
        (``refine_width = config.width``), in eval mode.
    """
    config = config or RefinerTrainingConfig()
    base = getattr(model, "instance_decoder", None)
    if base is None or base.needs_image:
        raise ValueError("an image refiner is trained for a model whose instance decoder has none yet")
    if len(train) == 0:
        raise ValueError("the training set is empty")
    device = model.device
    base = base.eval()
    torch.manual_seed(config.seed)
    decoder = InstanceDecoder(dataclasses.replace(base.config, refine_width=config.width,
                                                  refine_depth=config.depth)).to(device)
    missing = decoder.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert all(k.startswith("refine.") for k in missing), missing
    decoder.eval().requires_grad_(False)
    refine = decoder.refine.requires_grad_(True)
    optimizer = torch.optim.AdamW(refine.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: rate_factor(config, step))
    run = ResumableRun(checkpoint_dir, (LAST, BEST), "refine", refine, optimizer, scheduler, config.as_dict(), device)
    contact = config.contact_weight > 0
    frames = _Frames(model, decoder, train, config.normalization, contact)
    val_frames = _Frames(model, decoder, validation, config.normalization, contact) if validation else None
    refine.train()

    def step_loss(rng: np.random.Generator) -> torch.Tensor:
        indices = rng.integers(len(frames), size=config.batch_size)
        return _loss(decoder, frames.crops(indices, config.crop, rng), device, config.contact_weight)

    validate = None if val_frames is None else lambda: _validate(decoder, val_frames, config, device)
    yield from run.steps(config, (frames, val_frames), step_loss, validate)
    return decoder.eval().requires_grad_(False)


def _validate(decoder: InstanceDecoder, frames: _Frames, config: RefinerTrainingConfig, device) -> float:
    decoder.refine.eval()
    losses, weights = [], []
    with torch.no_grad():
        for start in range(0, len(frames), config.batch_size):
            chunk = range(start, min(start + config.batch_size, len(frames)))
            losses.append(float(_loss(decoder, frames.whole(chunk), device, config.contact_weight)))
            weights.append(len(chunk))
    decoder.refine.train()
    return float(np.average(losses, weights=weights))
