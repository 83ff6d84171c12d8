"""The settings of a training run and its learning-rate schedule.

Every setting is recorded in the checkpoint (:meth:`TrainingConfig.to_dict`) so that a
run can be resumed or repeated from its file alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..core.preprocess import Normalization
from .losses import FOCAL_ALPHA, FOCAL_WEIGHT

__all__ = ["BASE_RECIPE", "MODES", "SCHEDULES", "TrainingConfig"]

MODES = ("decoder", "full")

BASE_RECIPE = {
    "focal_weight": FOCAL_WEIGHT,
    "focal_alpha": FOCAL_ALPHA,
    "iou_rank_weight": 0.0,
    "corrective_iterations": 3,
    "mask_prompt_probability": 1.0,
    "grad_clip": 0.0,
}
"""Settings that a run left open (None) takes from the model it trains, as recorded in
its checkpoint (:meth:`TrainingConfig.with_base_recipe`), and these values where the
checkpoint does not say (SAM's loss; three corrective rounds, each with the mask prompt; no
gradient clipping)."""
SCHEDULES = ("cosine", "step", "constant")


@dataclass
class TrainingConfig:
    """Settings of a training run (all recorded in the checkpoint).

    Parameters
    ----------
    mode
        ``"decoder"`` (prompt encoder and mask decoder; image embeddings computed once)
        or ``"full"`` (the whole model).
    steps
        Optimizer steps of the whole run; the learning-rate schedule spans them.
    learning_rate
        Peak learning rate of AdamW; None: 1e-4 for either mode. With native tiles, the
        model's own loss and the best validation kept, 1e-4 gained more than 1e-5 in a
        10-minute fine-tune of the default model on DSB nuclei (point 0.597 against
        0.577 on held-out images; docs/default_model.md, "Fine-tuning that helps"); before
        those, 1e-4 had lost box and correction IoU and 1e-5 was the default.
    weight_decay
        AdamW weight decay (0.1 as in SAM), applied to weight matrices and kernels only.
    warmup_steps
        Linear warm-up from ``learning_rate / warmup_steps`` to ``learning_rate``.
    schedule
        After warm-up: ``"cosine"`` decay to ``min_lr_fraction * learning_rate``,
        ``"step"`` (multiply by ``decay_factor`` at each of ``decay_steps``, as SAM) or
        ``"constant"``.
    decay_steps, decay_factor, min_lr_fraction
        See ``schedule``.
    objects_per_image
        Objects drawn from each image per step (SAM: up to 64 masks per GPU).
    images_per_step
        Images whose gradients are summed into one step.
    corrective_iterations
        Iterations after the first prompt, each with one more corrective point and the
        previous logits as mask prompt (SAM: 8 plus 2 mask-only ones); None: the trained
        model's own, else 3 (:data:`BASE_RECIPE`).
    mask_prompt_probability
        Chance that a corrective iteration gets the previous logits as mask prompt (SAM:
        always); otherwise it sees the points alone, as the viewer's tiled previews ask;
        None: the trained model's own, else 1.
    box_probability
        Chance that the first prompt is a box rather than a point (SAM: 0.5).
    central_click_probability
        Chance that a first click lands in the object's inner part (pixels at least half
        as deep as its deepest, where people click) rather than anywhere in it (SAM: 0,
        and the default model learned that way). Fine-tuning draws 0.75 by default: ten
        minutes on held-out H&E tiles then raised a click by 0.030-0.037 (two seeds) where
        uniform clicks gave 0.005-0.023, and every correction with it (docs/default_model.md,
        "Fine-tuning with clicks where people click").
    box_noise, max_box_noise
        Box jitter: standard deviation as a fraction of the side, clipped to pixels.
        SAM learned from boxes jittered by 0.1 (at most 20 pixels), and so did the
        default model; ten minutes of fine-tuning it that way did not move the box. With
        0.02 (the default: under a pixel on a nucleus 30 pixels across) the box gained
        0.014-0.017 on held-out H&E tiles (two seeds) and stopped falling on held-out DSB
        nuclei, while boxes jittered by 0.1 scored as before (docs/default_model.md,
        "Fine-tuning on exact boxes").
    point_placement
        Corrective points: ``"center"`` of the larger error region or ``"random"`` in it.
    mask_loss_upscale
        Where masks are compared with their objects: 1 in the decoder's low-res grid (a
        quarter of the model input per side) against objects reduced to it, as until now;
        2 or 4 with the logits enlarged by bilinear interpolation as inference enlarges
        them (:meth:`Sam.postprocess_masks`), against objects at that finer grid (4: the
        model input itself), so that the decoder learns where between its low-res pixels
        an outline falls. It costs memory: for a 1024-pixel model, 8 objects and four
        corrective rounds, about 1.5 GiB per image at 4 (40 MiB at 1). Ten minutes of
        fine-tuning at 4 scored as the default does (docs/default_model.md, "Fine-tuning
        with masks judged where inference draws them").
    min_object_pixels
        Smaller objects are never drawn.
    focal_weight, dice_weight, iou_weight
        Loss weights (SAM: 20, 1 and 1). ``focal_weight`` None: the one the model being
        trained was trained with, when its checkpoint records it, else SAM's 20 (see
        :meth:`with_base_recipe`).
    focal_alpha
        Weight of object pixels in the focal loss (SAM: 0.25; negative: unweighted); None:
        the trained model's own, else 0.25, like ``focal_weight``.
    iou_rank_weight
        Weight of a ranking term on the three masks of a lone click
        (:func:`~napari_sam.train.losses.iou_ranking_loss`): the IoU head must also order
        them, since it chooses which one the user sees; it joins the IoU part of the loss
        (so ``iou_weight`` scales it too). 0: SAM's squared error alone; None: the
        trained model's own, else 0.
    native_tiles
        Train on the tiles inference embeds (:func:`~napari_sam.train.tiles.inference_tiles`),
        at the planes' own resolution, instead of whole planes squeezed into the input.
    freeze_encoder_blocks
        In ``"full"`` mode, the first K encoder blocks (and the patch embedding) stay frozen.
    bfloat16
        Run forward passes under bfloat16 autocast (GPUs with native bfloat16).
    grad_clip
        Clip the gradient norm to this value; 0: no clipping; None: the trained model's
        own, else no clipping.
    validate_every
        Validate every this many steps (and after the last step) when validation data
        are given; 0 never.
    validation_objects
        Objects per validation image.
    seed
        Seeds every random draw; step ``n`` draws from ``(seed, n)``, so a resumed run
        repeats the draws of an uninterrupted one.
    normalization
        How intensities become SAM's 0-255 range (as at inference).
    """

    mode: str = "decoder"
    steps: int = 1000
    learning_rate: float | None = None
    weight_decay: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"
    decay_steps: tuple[int, ...] = ()
    decay_factor: float = 0.1
    min_lr_fraction: float = 0.0
    objects_per_image: int = 8
    images_per_step: int = 1
    corrective_iterations: int | None = None
    mask_prompt_probability: float | None = None
    box_probability: float = 0.5
    central_click_probability: float = 0.75
    box_noise: float = 0.02
    max_box_noise: float = 20.0
    point_placement: str = "center"
    mask_loss_upscale: int = 1
    min_object_pixels: int = 16
    focal_weight: float | None = None
    focal_alpha: float | None = None
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    iou_rank_weight: float | None = None
    freeze_encoder_blocks: int = 0
    bfloat16: bool = False
    grad_clip: float | None = None
    validate_every: int = 100
    validation_objects: int = 16
    seed: int = 0
    normalization: Normalization = field(default_factory=Normalization)
    native_tiles: bool = True

    def __post_init__(self):
        self.decay_steps = tuple(int(s) for s in self.decay_steps)
        if isinstance(self.normalization, Mapping):
            norm = dict(self.normalization)
            if norm.get("limits") is not None:
                norm["limits"] = tuple(norm["limits"])
            self.normalization = Normalization(**norm)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, not {self.schedule!r}")
        if self.mask_loss_upscale not in (1, 2, 4) or isinstance(self.mask_loss_upscale, bool):
            raise ValueError(f"mask_loss_upscale must be 1, 2 or 4, not {self.mask_loss_upscale!r}")
        if self.point_placement not in ("center", "random"):
            raise ValueError(f"point_placement must be 'center' or 'random', not {self.point_placement!r}")
        positive = {
            "steps": self.steps,
            "objects_per_image": self.objects_per_image,
            "images_per_step": self.images_per_step,
        }
        for name, value in positive.items():
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        non_negative = {
            "warmup_steps": self.warmup_steps,
            "corrective_iterations": 0 if self.corrective_iterations is None else self.corrective_iterations,
            "freeze_encoder_blocks": self.freeze_encoder_blocks,
            "validate_every": self.validate_every,
            "min_object_pixels": self.min_object_pixels,
            "validation_objects": self.validation_objects,
        }
        for name, value in non_negative.items():
            if int(value) != value or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        for name in ("weight_decay", "box_noise", "max_box_noise", "focal_weight", "dice_weight", "iou_weight",
                     "iou_rank_weight"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.box_noise > 1:  # a fraction of the box's size: beyond it a box says nothing of its object
            raise ValueError(f"box_noise must lie in [0, 1], got {self.box_noise}")
        if self.mask_prompt_probability is not None and not 0 <= self.mask_prompt_probability <= 1:
            raise ValueError(f"mask_prompt_probability must lie in [0, 1], got {self.mask_prompt_probability}")
        for name in ("box_probability", "central_click_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.min_lr_fraction <= 1 or not 0 < self.decay_factor <= 1:
            raise ValueError("min_lr_fraction must lie in [0, 1] and decay_factor in (0, 1]")
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 (0: no clipping) or None, got {self.grad_clip}")
        if self.freeze_encoder_blocks and self.mode != "full":
            raise ValueError(
                "freeze_encoder_blocks applies to mode 'full' only (the decoder mode freezes the whole encoder)"
            )

    def with_base_recipe(self, metadata: Mapping[str, Any] | None) -> "TrainingConfig":
        """These settings with those left None filled in (:data:`BASE_RECIPE`).

        A model keeps learning best with the recipe it was trained with. The default
        model learned with focal:dice 1:1 and no alpha, and fine-tuning it with SAM's 20:1
        and alpha 0.25 lost IoU on held-out nuclei; it learned to rank a click's three
        masks, in four corrective rounds with the mask prompt 70 % of the time and its
        gradients clipped; ten minutes of fine-tuning without the ranking term or the
        clipping lowered the second and third corrections on H&E tiles, with the whole
        recipe no figure fell (docs/default_model.md, "Fine-tuning with the model's own
        recipe"). Settings left None take the values recorded in
        ``metadata["training"]["settings"]`` (a checkpoint written by this package's
        trainer), else those of :data:`BASE_RECIPE`.

        Parameters
        ----------
        metadata
            The base model's checkpoint metadata (``Sam.metadata``), or None.
        """
        recorded: Mapping[str, Any] = {}
        training = (metadata or {}).get("training")
        if isinstance(training, Mapping) and isinstance(training.get("settings"), Mapping):
            recorded = training["settings"]
        values: dict[str, Any] = {}
        for name, fallback in BASE_RECIPE.items():
            if getattr(self, name) is None:
                value = recorded.get(name)
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                values[name] = type(fallback)(value) if ok else fallback
        return dataclasses.replace(self, **values) if values else self

    @property
    def peak_learning_rate(self) -> float:
        """``learning_rate``, or the default (1e-4)."""
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return 1e-4

    def learning_rate_at(self, step: int) -> float:
        """Learning rate for the step that follows ``step`` completed steps.

        Parameters
        ----------
        step
            Steps done so far (0 for the first step).
        """
        peak = self.peak_learning_rate
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return peak
        if self.schedule == "step":
            return peak * self.decay_factor ** sum(step >= s for s in self.decay_steps)
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.min_lr_fraction
        return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (for checkpoint metadata)."""
        out = dataclasses.asdict(self)
        out["decay_steps"] = list(self.decay_steps)
        norm = out["normalization"]
        if norm.get("limits") is not None:
            norm["limits"] = list(norm["limits"])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainingConfig":
        """Inverse of :meth:`to_dict`; unknown keys are refused.

        Raises
        ------
        ValueError
            For keys that are not settings, or invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings: {unknown}")
        return cls(**dict(data))
