"""Fine-tuning SAM on instance-labelled microscopy planes.

Training follows SAM's interactive recipe (Kirillov et al. 2023, appendix A): for several
objects of an image, a first prompt (one point inside the object, or its slightly noisy
bounding box) is simulated from the ground truth, the decoder answers, and a few
corrective iterations follow, each adding a click in the error region of the previous
answer and feeding that answer's low-res logits back as the mask prompt. Masks are
supervised with focal and dice loss at 20:1 in the decoder's low-res frame, the IoU head
with the squared error to each mask's actual IoU. For the single-point first prompt the
decoder returns its three ambiguity-aware masks and only the one with the lowest loss is
supervised, so the other two stay free to cover other readings of the click.

Two modes:

``"decoder"``
    Only the prompt encoder and mask decoder learn. The image encoder is frozen, so each
    image is embedded once and its embedding kept in memory: cheap enough for a CPU.
``"full"``
    The whole model learns (optionally with the first K encoder blocks frozen); every
    step runs the encoder. Needs a GPU in practice.

:class:`Trainer` runs the steps and yields a :class:`TrainingRecord` per step, so a GUI or
a progress bar can drive it; :func:`train` wraps it with tqdm. Checkpoints are written in
the official key format with the configuration and the training provenance as metadata
(:func:`napari_sam.core.models.load_model` reads them), optimizer state beside them.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..model import Sam, SamConfig, config_from_dict, config_to_dict, infer_config, sam_from_state_dict
from ..model.checkpoint import read_checkpoint, write_checkpoint
from .losses import iou_prediction_loss, mask_iou, mask_loss
from .preprocess import Normalization, prepare_plane
from .prompt_simulation import bounding_box, corrective_point, interior_point, random_point

__all__ = [
    "MODES",
    "TrainingPair",
    "SegmentationDataset",
    "TrainingConfig",
    "TrainingRecord",
    "LossParts",
    "Trainer",
    "object_ids",
    "low_res_targets",
    "optimizer_state_path",
    "train",
]

PathLike = Union[str, "os.PathLike[str]"]

MODES = ("decoder", "full")
SCHEDULES = ("cosine", "step", "constant")
CHECKPOINT_FORMAT = 1
"""Version of the metadata layout written by :meth:`Trainer.save`."""

_PAD_LABEL = -1  # the prompt encoder's "not a point": keeps prompt counts equal across objects
_MAX_HISTORY = 2000  # loss records kept in checkpoint metadata (thinned beyond that)
_VALIDATION_SEED = 7919  # separates validation prompts from training draws of the same seed


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingPair:
    """One training plane and its instance labels.

    Attributes
    ----------
    image
        (H, W) grayscale or (H, W, C) plane, any dtype.
    labels
        (H, W) integer instance labels, 0 = background.
    name
        Where it came from (file name, ``"z=12"``, ``"array 3"``).
    """

    image: np.ndarray
    labels: np.ndarray
    name: str


def _check_pair(image: np.ndarray, labels: np.ndarray, name: str) -> None:
    if labels.ndim != 2:
        raise ValueError(f"{name}: labels must be one 2D plane (H, W), got shape {labels.shape}")
    if labels.dtype.kind not in "iub":
        raise ValueError(f"{name}: labels must be integer instance ids, got dtype {labels.dtype}")
    if image.ndim not in (2, 3):
        raise ValueError(f"{name}: the image must be a 2D plane (H, W) or (H, W, C), got shape {image.shape}")
    if image.shape[:2] != labels.shape and not (image.ndim == 3 and image.shape[1:] == labels.shape):
        raise ValueError(f"{name}: image {image.shape} and labels {labels.shape} do not cover the same pixels")


def object_ids(labels: np.ndarray, min_pixels: int = 1) -> np.ndarray:
    """Instance ids of a label plane with at least ``min_pixels`` pixels, sorted.

    Parameters
    ----------
    labels
        (H, W) integer labels, 0 = background.
    min_pixels
        Smaller objects are left out (a few pixels give no useful gradient and may vanish
        in the decoder's low-res frame).

    Returns
    -------
    numpy.ndarray
        The ids, background excluded.
    """
    ids, counts = np.unique(np.asarray(labels), return_counts=True)
    keep = (ids != 0) & (counts >= min_pixels)
    return ids[keep]


class SegmentationDataset:
    """(image plane, instance label plane) pairs for training.

    Build one with :meth:`from_arrays`, :meth:`from_folder` or :meth:`from_stack`; planes
    from files are read when first needed and then kept in memory.

    Parameters
    ----------
    loaders
        One callable per pair returning ``(image, labels)``.
    names
        A name per pair, for messages and provenance.
    description
        JSON-friendly description of the source (kept in checkpoints).
    channel_axis, channel
        How multichannel planes become RGB; see :func:`~napari_sam.core.preprocess.to_rgb`.
    """

    def __init__(
        self,
        loaders: Sequence[Callable[[], tuple[np.ndarray, np.ndarray]]],
        names: Sequence[str],
        description: Mapping[str, Any] | None = None,
        channel_axis: int | None = None,
        channel: int | None = None,
    ):
        if len(loaders) != len(names):
            raise ValueError(f"{len(loaders)} loaders but {len(names)} names")
        self._loaders = list(loaders)
        self.names = [str(n) for n in names]
        self.description = dict(description or {"source": "custom"})
        self.channel_axis = channel_axis
        self.channel = channel
        self._loaded: dict[int, TrainingPair] = {}

    # -- constructors ------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        names: Sequence[str] | None = None,
        channel_axis: int | None = None,
        channel: int | None = None,
    ) -> "SegmentationDataset":
        """Pairs from in-memory planes.

        Parameters
        ----------
        images
            2D planes, (H, W) or (H, W, C).
        labels
            (H, W) integer instance labels, one per image.
        names
            Optional names; ``"array 0"``, ``"array 1"``, ... by default.
        channel_axis, channel
            See the class.

        Raises
        ------
        ValueError
            For unequal numbers of images and labels, an empty list, or a pair whose shapes
            do not match.
        """
        images, labels = list(images), list(labels)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} label planes")
        if not images:
            raise ValueError("no training pairs given")
        names = [f"array {i}" for i in range(len(images))] if names is None else list(names)
        pairs = []
        for img, lab, name in zip(images, labels, names):
            img, lab = np.asarray(img), np.asarray(lab)
            _check_pair(img, lab, name)
            pairs.append((img, lab))
        loaders = [(lambda p=p: p) for p in pairs]
        return cls(loaders, names, {"source": "arrays", "pairs": len(pairs)}, channel_axis, channel)

    @classmethod
    def from_stack(
        cls,
        image: np.ndarray,
        labels: np.ndarray,
        skip_empty: bool = True,
        channel: int | None = None,
        name: str = "stack",
    ) -> "SegmentationDataset":
        """Every z plane of a 3D stack as a pair.

        Parameters
        ----------
        image
            (Z, H, W) stack, or (Z, H, W, C) with channels last.
        labels
            (Z, H, W) instance labels.
        skip_empty
            Leave out planes without any labelled object.
        channel
            Channel to use for a multichannel stack that is not RGB.
        name
            Prefix of the plane names (``"stack z=3"``).

        Raises
        ------
        ValueError
            For shapes that are not stacks or do not match, or when no plane is left.
        """
        image, labels = np.asarray(image), np.asarray(labels)
        if labels.ndim != 3:
            raise ValueError(f"labels must be a (Z, H, W) stack, got shape {labels.shape}")
        if image.ndim not in (3, 4) or image.shape[:3] != labels.shape:
            raise ValueError(f"image {image.shape} must be (Z, H, W) or (Z, H, W, C) matching labels {labels.shape}")
        planes = [z for z in range(labels.shape[0]) if not skip_empty or labels[z].any()]
        if not planes:
            raise ValueError("the label stack holds no object in any plane")
        loaders = [(lambda z=z: (image[z], labels[z])) for z in planes]
        names = [f"{name} z={z}" for z in planes]
        desc = {"source": "stack", "name": name, "shape": list(labels.shape), "planes": planes}
        return cls(loaders, names, desc, -1 if image.ndim == 4 else None, channel)

    @classmethod
    def from_folder(
        cls,
        folder: PathLike,
        images: str = "images",
        labels: str = "labels",
        pattern: str = "*.tif*",
        skip_empty: bool = True,
        channel_axis: int | None = None,
        channel: int | None = None,
    ) -> "SegmentationDataset":
        """Pairs of TIFF files: ``folder/images/NAME`` with ``folder/labels/NAME``.

        A label file holding a 3D stack contributes each of its z planes (with the
        matching planes of the image file).

        Parameters
        ----------
        folder
            Holds the two subfolders.
        images, labels
            Their names.
        pattern
            Which image files to take (glob).
        skip_empty
            Leave out stack planes without objects.
        channel_axis, channel
            See the class.

        Raises
        ------
        ValueError
            When a folder is missing, holds no image, or an image has no label file.
        """
        import tifffile

        root = Path(folder).expanduser()
        img_dir, lab_dir = root / images, root / labels
        for d in (img_dir, lab_dir):
            if not d.is_dir():
                raise ValueError(f"no folder {d}: expected {images}/ and {labels}/ with files of the same names")
        files = sorted(p for p in img_dir.glob(pattern) if p.is_file())
        if not files:
            raise ValueError(f"no image files matching {pattern!r} in {img_dir}")
        missing = [p.name for p in files if not (lab_dir / p.name).is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
            raise ValueError(
                f"{len(missing)} image(s) in {img_dir} have no label file of the same name in {lab_dir}: {shown}"
            )

        cache: dict[Path, tuple[np.ndarray, np.ndarray]] = {}

        def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
            # A stack file is read once for all its planes.
            if path not in cache:
                cache.clear()
                cache[path] = (tifffile.imread(path), tifffile.imread(lab_dir / path.name))
            return cache[path]

        loaders, names = [], []
        for path in files:
            with tifffile.TiffFile(lab_dir / path.name) as tif:
                shape = tif.series[0].shape
            if len(shape) == 2:
                loaders.append(lambda p=path: read(p))
                names.append(path.name)
            elif len(shape) == 3:
                lab = read(path)[1]
                for z in range(shape[0]):
                    if skip_empty and not lab[z].any():
                        continue
                    loaders.append(lambda p=path, z=z: (read(p)[0][z], read(p)[1][z]))
                    names.append(f"{path.name} z={z}")
            else:
                raise ValueError(f"{lab_dir / path.name}: labels must be 2D or a 3D stack, got shape {shape}")
        if not loaders:
            raise ValueError(f"no labelled plane found in {root}")
        desc = {"source": "folder", "path": str(root.resolve()), "files": len(files), "pairs": len(loaders)}
        return cls(loaders, names, desc, channel_axis, channel)

    # -- access ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._loaders)

    def __getitem__(self, index: int) -> TrainingPair:
        if not -len(self) <= index < len(self):
            raise IndexError(f"pair {index} of a dataset of {len(self)}")
        index %= len(self)
        if index not in self._loaded:
            image, labels = self._loaders[index]()
            image, labels = np.asarray(image), np.asarray(labels)
            _check_pair(image, labels, self.names[index])
            self._loaded[index] = TrainingPair(image, labels, self.names[index])
        return self._loaded[index]

    def subset(self, indices: Sequence[int]) -> "SegmentationDataset":
        """The pairs at ``indices``, as a new dataset."""
        indices = [int(i) % len(self) for i in indices]
        desc = dict(self.description, subset=indices)
        return SegmentationDataset(
            [self._loaders[i] for i in indices], [self.names[i] for i in indices], desc, self.channel_axis, self.channel
        )

    def split(
        self, validation_fraction: float = 0.1, seed: int = 0
    ) -> tuple["SegmentationDataset", "SegmentationDataset"]:
        """A random (training, validation) split; each part keeps at least one pair.

        Raises
        ------
        ValueError
            For a fraction outside (0, 1) or fewer than two pairs.
        """
        if not 0 < validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction}")
        if len(self) < 2:
            raise ValueError("splitting needs at least two pairs")
        order = np.random.default_rng(seed).permutation(len(self))
        n_val = min(len(self) - 1, max(1, round(validation_fraction * len(self))))
        return self.subset(sorted(order[n_val:])), self.subset(sorted(order[:n_val]))

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description of the data (what checkpoints record)."""
        names = self.names if len(self.names) <= 50 else self.names[:50] + [f"... ({len(self.names) - 50} more)"]
        return dict(self.description, pairs=len(self), names=names)


# --------------------------------------------------------------------------------------
# configuration and records
# --------------------------------------------------------------------------------------


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
        Peak learning rate of AdamW; None: 1e-4 for ``"decoder"``, 1e-5 for ``"full"``.
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
        previous logits as mask prompt (SAM: 8 plus 2 mask-only ones).
    mask_prompt_probability
        Chance that a corrective iteration gets the previous logits as mask prompt (SAM:
        always); otherwise it sees the points alone, as the viewer's tiled previews ask.
    box_probability
        Chance that the first prompt is a box rather than a point (SAM: 0.5).
    box_noise, max_box_noise
        Box jitter: standard deviation as a fraction of the side, clipped to pixels.
    point_placement
        Corrective points: ``"center"`` of the larger error region or ``"random"`` in it.
    min_object_pixels
        Smaller objects are never drawn.
    focal_weight, dice_weight, iou_weight
        Loss weights (20, 1 and 1 as in SAM).
    focal_alpha
        Weight of object pixels in the focal loss (0.25; negative: unweighted).
    freeze_encoder_blocks
        In ``"full"`` mode, the first K encoder blocks (and the patch embedding) stay frozen.
    bfloat16
        Run forward passes under bfloat16 autocast (GPUs with native bfloat16).
    grad_clip
        Clip the gradient norm to this value; None: no clipping.
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
    corrective_iterations: int = 3
    mask_prompt_probability: float = 1.0
    box_probability: float = 0.5
    box_noise: float = 0.1
    max_box_noise: float = 20.0
    point_placement: str = "center"
    min_object_pixels: int = 16
    focal_weight: float = 20.0
    focal_alpha: float = 0.25
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    freeze_encoder_blocks: int = 0
    bfloat16: bool = False
    grad_clip: float | None = None
    validate_every: int = 100
    validation_objects: int = 16
    seed: int = 0
    normalization: Normalization = field(default_factory=Normalization)

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
            "corrective_iterations": self.corrective_iterations,
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
        for name in ("weight_decay", "box_noise", "max_box_noise", "focal_weight", "dice_weight", "iou_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.mask_prompt_probability <= 1:
            raise ValueError(f"mask_prompt_probability must lie in [0, 1], got {self.mask_prompt_probability}")
        if not 0 <= self.box_probability <= 1:
            raise ValueError(f"box_probability must lie in [0, 1], got {self.box_probability}")
        if not 0 <= self.min_lr_fraction <= 1 or not 0 < self.decay_factor <= 1:
            raise ValueError("min_lr_fraction must lie in [0, 1] and decay_factor in (0, 1]")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.freeze_encoder_blocks and self.mode != "full":
            raise ValueError(
                "freeze_encoder_blocks applies to mode 'full' only (the decoder mode freezes the whole encoder)"
            )

    @property
    def peak_learning_rate(self) -> float:
        """``learning_rate``, or the default of the mode."""
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return 1e-4 if self.mode == "decoder" else 1e-5

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


@dataclass(frozen=True)
class TrainingRecord:
    """What one training step reports.

    Attributes
    ----------
    step
        Steps completed, this one included.
    loss
        Total loss of the step (mask loss plus weighted IoU loss, mean over iterations).
    mask_loss, iou_loss
        Its two parts (unweighted).
    train_iou
        Mean IoU of the last iteration's masks with the ground truth (low-res frame).
    learning_rate
        Used for this step.
    seconds
        Wall time of the step.
    validation_iou
        Mean IoU on the validation data when this step validated, else None.
    validation
        Its breakdown (``point``, ``box``, ``objects``) or None.
    """

    step: int
    loss: float
    mask_loss: float
    iou_loss: float
    train_iou: float
    learning_rate: float
    seconds: float
    validation_iou: float | None = None
    validation: dict[str, float] | None = None


@dataclass
class _Features:
    embedding: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


@dataclass
class LossParts:
    """The loss of one simulated interactive session on one image.

    Attributes
    ----------
    loss
        ``mask_loss + iou_weight * iou_loss`` (a scalar tensor that can be backpropagated).
    mask_loss, iou_loss
        Means over objects and iterations.
    train_iou
        Mean IoU of the last iteration's masks (low-res frame).
    """

    loss: torch.Tensor
    mask_loss: torch.Tensor
    iou_loss: torch.Tensor
    train_iou: float


# --------------------------------------------------------------------------------------
# geometry shared with the predictor
# --------------------------------------------------------------------------------------


def low_res_targets(masks: torch.Tensor, input_size: tuple[int, int], image_size: int = 1024) -> torch.Tensor:
    """Ground-truth masks in the decoder's low-res frame, as {0, 1} floats.

    The plane is resized so that it occupies ``input_size`` of the padded square model
    input (as :func:`~napari_sam.core.preprocess.prepare_plane` resizes the image), padded
    at the bottom and right, and reduced 4x per side to the decoder's output grid: a
    low-res pixel belongs to the object when at least half of what it covers does. This
    is the inverse of :meth:`Sam.postprocess_masks`.

    Parameters
    ----------
    masks
        (N, H, W) boolean or {0, 1} masks at the plane's original size.
    input_size
        (h, w) of the resized plane inside the model input.
    image_size
        Side of the square model input (1024).

    Returns
    -------
    torch.Tensor
        (N, 1, image_size / 4, image_size / 4) float32, on the masks' device.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {tuple(masks.shape)}")
    h, w = input_size
    if not (0 < h <= image_size and 0 < w <= image_size):
        raise ValueError(f"input_size {input_size} does not fit a {image_size}x{image_size} model input")
    x = masks[:, None].float()
    if tuple(x.shape[-2:]) != (h, w):
        shrinking = h < x.shape[-2] or w < x.shape[-1]
        x = F.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=shrinking)
    x = F.pad(x, (0, image_size - w, 0, image_size - h))
    return (F.avg_pool2d(x, 4) >= 0.5).float()


def _scale(input_size: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
    # Exactly the predictor's mapping from original pixels to the model-input frame.
    (h, w), (H, W) = input_size, original_size
    return np.array([w / W, h / H])


# --------------------------------------------------------------------------------------
# configuration of the SAM model, to and from JSON
# --------------------------------------------------------------------------------------


def _encoder_blocks(encoder: torch.nn.Module) -> tuple[list[torch.nn.Module], list[torch.nn.Parameter]]:
    """(blocks in order, stem parameters) of a ViT or TinyViT encoder."""
    if hasattr(encoder, "blocks"):
        stem = list(encoder.patch_embed.parameters()) + [encoder.pos_embed]
        return list(encoder.blocks), stem
    if hasattr(encoder, "layers"):
        return [b for layer in encoder.layers for b in layer.blocks], list(encoder.patch_embed.parameters())
    raise ValueError(f"do not know the blocks of a {type(encoder).__name__} encoder")


# --------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------


def optimizer_state_path(checkpoint: PathLike) -> Path:
    """Where :meth:`Trainer.save` keeps the optimizer state of ``checkpoint``."""
    path = Path(checkpoint)
    return path.with_name(path.name + ".optimizer.pt")


class Trainer:
    """Fine-tunes a SAM on instance-labelled planes.

    Parameters
    ----------
    model
        The model to train, in place (it is moved to ``device``; in ``"full"`` mode its
        encoder is cast to float32). Gradients are switched on for the trained parts
        and off for the rest.
    train_data
        Training pairs.
    config
        Settings; see :class:`TrainingConfig`.
    validation_data
        Pairs to measure the IoU on (point and box prompts), or None.
    device
        ``"cpu"``, ``"cuda"``, ... or None/``"auto"`` for the best one present.

    Examples
    --------
    >>> data = SegmentationDataset.from_folder("dsb2018_fluo")          # doctest: +SKIP
    >>> trainer = Trainer(load_model("vit_b"), data, TrainingConfig(steps=500))  # doctest: +SKIP
    >>> for record in trainer.run():                                   # doctest: +SKIP
    ...     print(record.step, record.loss)
    >>> trainer.save("vit_b_nuclei.pth")                               # doctest: +SKIP
    """

    def __init__(
        self,
        model: Sam,
        train_data: SegmentationDataset,
        config: TrainingConfig | None = None,
        validation_data: SegmentationDataset | None = None,
        device: str | torch.device | None = None,
    ):
        from .models import resolve_device

        if not isinstance(model, Sam):
            raise ValueError(f"model must be a Sam, not {type(model).__name__}")
        if len(train_data) == 0:
            raise ValueError("the training data hold no pair")
        self.config = config or TrainingConfig()
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.train_data = train_data
        self.validation_data = validation_data
        self.step = 0
        self.history: list[dict[str, float]] = []
        # Keyed by the dataset object itself: indices alone would mix up datasets.
        self._cache: dict[SegmentationDataset, dict[int, _Features]] = {}
        self._base_model = self._describe_base(model)

        cfg = self.config
        if cfg.bfloat16 and self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"bfloat16 autocast is supported on CPU and CUDA, not {self.device.type}")
        if cfg.mode == "full":
            self.model.image_encoder.float()
        for p in self.model.parameters():
            p.requires_grad_(False)
        for module in (self.model.prompt_encoder, self.model.mask_decoder):
            for p in module.parameters():
                p.requires_grad_(True)
        if cfg.mode == "full":
            blocks, stem = _encoder_blocks(self.model.image_encoder)
            if cfg.freeze_encoder_blocks > len(blocks):
                raise ValueError(
                    f"freeze_encoder_blocks={cfg.freeze_encoder_blocks}, but the encoder has only {len(blocks)} blocks"
                )
            for p in self.model.image_encoder.parameters():
                p.requires_grad_(True)
            if cfg.freeze_encoder_blocks:
                for p in stem:
                    p.requires_grad_(False)
                for block in blocks[: cfg.freeze_encoder_blocks]:
                    for p in block.parameters():
                        p.requires_grad_(False)
                # A TinyViT stage's downsampling belongs to it: frozen with its last block.
                for layer in getattr(self.model.image_encoder, "layers", []):
                    if getattr(layer, "downsample", None) is not None and all(
                        not p.requires_grad for b in layer.blocks for p in b.parameters()
                    ):
                        layer.downsample.requires_grad_(False)

        self._param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        named = dict(self.model.named_parameters())
        # Weight decay on matrices and kernels only: decaying norms, biases and learned
        # embeddings towards zero only hurts.
        decay = [named[n] for n in self._param_names if named[n].ndim >= 2 and not n.endswith("pos_embed")]
        no_decay = [named[n] for n in self._param_names if not (named[n].ndim >= 2 and not n.endswith("pos_embed"))]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.learning_rate_at(0),
        )

    # -- provenance --------------------------------------------------------------------
    @staticmethod
    def _describe_base(model: Sam) -> dict[str, Any]:
        source = getattr(model, "source", None)
        out: dict[str, Any] = {"config": getattr(model.config, "name", "custom")}
        if source is not None:
            out.update(name=source.name, checksum=source.checksum)
        previous = getattr(model, "checkpoint_metadata", {}).get("training")
        if previous:
            out["fine_tuned"] = {k: previous.get(k) for k in ("mode", "steps", "date", "data")}
        return out

    # -- features ----------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bfloat16)

    def _embed(self, data: SegmentationDataset, pair: TrainingPair) -> _Features:
        x, original_size = prepare_plane(
            pair.image,
            self.config.normalization,
            data.channel_axis,
            data.channel,
            long_side=self.model.config.image_size,
        )
        with self._autocast():
            emb = self.model.embed(x.to(self.device))
        return _Features(emb.float(), (int(x.shape[-2]), int(x.shape[-1])), original_size)

    def _features(self, data: SegmentationDataset, index: int, grad: bool) -> _Features:
        if self.config.mode == "full":
            with torch.set_grad_enabled(grad):
                return self._embed(data, data[index])
        cache = self._cache.setdefault(data, {})
        if index not in cache:
            # The frozen encoder's answer never changes: embed once, keep it on the CPU.
            with torch.no_grad():
                feats = self._embed(data, data[index])
            cache[index] = _Features(feats.embedding.cpu(), feats.input_size, feats.original_size)
        f = cache[index]
        return _Features(f.embedding.to(self.device), f.input_size, f.original_size)

    def clear_cache(self) -> None:
        """Forget the cached image embeddings (e.g. after changing the encoder)."""
        self._cache.clear()

    # -- one image ---------------------------------------------------------------------
    def _decode(self, feats: _Features, points, labels, boxes, mask_input, multimask: bool):
        with self._autocast():
            low, iou = self.model.decode(
                feats.embedding, points, labels, boxes, mask_input, multimask_output=multimask, context=None
            )
        return low.float(), iou.float()

    def _upscale(self, low: torch.Tensor, feats: _Features) -> np.ndarray:
        with torch.no_grad():
            full = self.model.postprocess_masks(low.float(), feats.input_size, feats.original_size)
        return (full[:, 0] > self.model.mask_threshold).cpu().numpy()

    def image_loss(self, data: SegmentationDataset, index: int, rng: np.random.Generator) -> LossParts | None:
        """Simulate an interactive session on one image and return its loss.

        Draws up to ``objects_per_image`` objects, gives each a first prompt (a random
        point inside it, or its noisy box), then ``corrective_iterations`` more rounds
        with a point in the larger error region of the previous mask and that mask's
        logits as mask prompt. Gradients flow when called with grad enabled.

        Parameters
        ----------
        data
            The dataset.
        index
            Which pair.
        rng
            Every random draw comes from it.

        Returns
        -------
        loss parts or None
            None when the plane has no object of ``min_object_pixels`` pixels.
        """
        cfg = self.config
        pair = data[index]
        ids = object_ids(pair.labels, cfg.min_object_pixels)
        if ids.size == 0:
            return None
        chosen = rng.choice(ids, size=min(cfg.objects_per_image, ids.size), replace=False)
        masks = pair.labels[None] == chosen[:, None, None]

        feats = self._features(data, index, grad=torch.is_grad_enabled())
        size = self.model.config.image_size
        targets = low_res_targets(torch.from_numpy(masks).to(self.device), feats.input_size, size)
        # An object that shrinks below one low-res pixel (a small one in a large plane)
        # would teach the decoder to answer every prompt with nothing.
        visible = targets.flatten(1).any(dim=1).cpu().numpy()
        if not visible.all():
            if not visible.any():
                return None
            masks, targets = masks[visible], targets[torch.from_numpy(visible).to(self.device)]
        scale = _scale(feats.input_size, feats.original_size)
        n = len(masks)

        use_box = rng.random() < cfg.box_probability
        boxes = points = labels = None
        if use_box:
            box = np.stack([bounding_box(m, rng, cfg.box_noise, cfg.max_box_noise) for m in masks])
            boxes = torch.as_tensor(box * np.tile(scale, 2), dtype=torch.float32, device=self.device)
            pts = np.zeros((n, 0, 2))
            lbl = np.zeros((n, 0), np.int64)
        else:
            pts = np.stack([random_point(m, rng) for m in masks])[:, None]
            lbl = np.ones((n, 1), np.int64)

        total_mask = total_iou = 0.0
        mask_input = None
        rows = torch.arange(n, device=self.device)
        iterations = 1 + cfg.corrective_iterations
        for it in range(iterations):
            if pts.shape[1]:
                points = torch.as_tensor(pts * scale, dtype=torch.float32, device=self.device)
                labels = torch.as_tensor(lbl, device=self.device)
            # Only a lone point is ambiguous; SAM predicts three masks for it and
            # supervises the best one.
            multimask = it == 0 and not use_box
            low, iou = self._decode(feats, points, labels, boxes, mask_input, multimask)
            per_mask = mask_loss(low, targets, cfg.focal_weight, cfg.dice_weight, cfg.focal_alpha)  # (n, C)
            best = per_mask.detach().argmin(dim=1)
            total_mask = total_mask + per_mask[rows, best].mean()
            total_iou = total_iou + iou_prediction_loss(iou, low, targets).mean()
            chosen_low = low[rows, best][:, None]
            if it == iterations - 1:
                train_iou = float(mask_iou(chosen_low, targets).mean())
                break
            pred = self._upscale(chosen_low.detach(), feats)
            # (no draw at probability 1, so runs without the option repeat exactly)
            keep = cfg.mask_prompt_probability >= 1 or rng.random() < cfg.mask_prompt_probability
            mask_input = chosen_low.detach() if keep else None
            new_pts = np.zeros((n, 1, 2))
            new_lbl = np.full((n, 1), _PAD_LABEL, np.int64)
            for i in range(n):
                click = corrective_point(masks[i], pred[i], rng, cfg.point_placement)
                if click is not None:
                    new_pts[i, 0], new_lbl[i, 0] = click
            pts = np.concatenate([pts, new_pts], axis=1)
            lbl = np.concatenate([lbl, new_lbl], axis=1)

        mask_part = total_mask / iterations
        iou_part = total_iou / iterations
        return LossParts(mask_part + cfg.iou_weight * iou_part, mask_part, iou_part, train_iou)

    # -- steps -------------------------------------------------------------------------
    def _rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, step])

    def train_step(self) -> TrainingRecord:
        """One optimizer step; returns its record (without validation)."""
        cfg = self.config
        start = time.perf_counter()
        rng = self._rng(self.step)
        lr = cfg.learning_rate_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = np.zeros(4)
        done = attempts = 0
        while done < cfg.images_per_step:
            attempts += 1
            if attempts > 20 * cfg.images_per_step:
                raise ValueError(
                    f"the training data hold no object of at least {cfg.min_object_pixels} pixels "
                    f"(tried {attempts - 1} draws)"
                )
            parts = self.image_loss(self.train_data, int(rng.integers(len(self.train_data))), rng)
            if parts is None:
                continue
            (parts.loss / cfg.images_per_step).backward()
            sums += [float(t.detach()) for t in (parts.loss, parts.mask_loss, parts.iou_loss)] + [parts.train_iou]
            done += 1
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], cfg.grad_clip
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        self.step += 1
        loss, mloss, iloss, tiou = (sums / cfg.images_per_step).tolist()
        self.history.append({"step": self.step, "loss": loss})
        return TrainingRecord(self.step, loss, mloss, iloss, tiou, lr, time.perf_counter() - start)

    def evaluate_loss(self, index: int = 0, seed: int = 0, data: SegmentationDataset | None = None) -> float:
        """The loss of one image with prompts drawn from ``seed``, without learning.

        The same ``index`` and ``seed`` give the same objects and prompts each time (the
        corrective points follow the model's own mistakes), which makes it a fixed batch
        to watch the loss on.

        Parameters
        ----------
        index
            Which pair.
        seed
            Seeds the draws.
        data
            The dataset; the training data by default.
        """
        data = self.train_data if data is None else data
        with torch.no_grad():
            parts = self.image_loss(data, index, np.random.default_rng([seed, _VALIDATION_SEED, index]))
        if parts is None:
            raise ValueError(f"pair {index} has no object of at least {self.config.min_object_pixels} pixels")
        return float(parts.loss)

    @torch.no_grad()
    def validate(self, data: SegmentationDataset | None = None) -> dict[str, float]:
        """Mean IoU of single-prompt predictions on validation data.

        Each validation object is prompted once with its most central point (the mask
        with the highest predicted IoU wins, as in the predictor) and once with its exact
        bounding box; the IoU is measured at the original resolution. Objects are drawn
        with a fixed seed, so successive validations compare the same objects.

        Parameters
        ----------
        data
            Defaults to the trainer's validation data.

        Returns
        -------
        dict
            ``iou`` (mean of both prompt kinds), ``point``, ``box`` and ``objects``.

        Raises
        ------
        ValueError
            Without validation data, or when they hold no object.
        """
        data = self.validation_data if data is None else data
        if data is None:
            raise ValueError("no validation data: pass validation_data to the Trainer or to validate()")
        cfg = self.config
        scores: dict[str, list[float]] = {"point": [], "box": []}
        self.model.eval()
        for index in range(len(data)):
            pair = data[index]
            ids = object_ids(pair.labels, cfg.min_object_pixels)
            if ids.size == 0:
                continue
            rng = np.random.default_rng([cfg.seed, _VALIDATION_SEED, index])
            if cfg.validation_objects and ids.size > cfg.validation_objects:
                ids = np.sort(rng.choice(ids, size=cfg.validation_objects, replace=False))
            masks = pair.labels[None] == ids[:, None, None]
            feats = self._features(data, index, grad=False)
            scale = _scale(feats.input_size, feats.original_size)
            pts = np.stack([interior_point(m) for m in masks])[:, None] * scale
            low, iou = self._decode(
                feats,
                torch.as_tensor(pts, dtype=torch.float32, device=self.device),
                torch.ones(len(ids), 1, dtype=torch.int64, device=self.device),
                None,
                None,
                True,
            )
            best = low[torch.arange(len(ids)), iou.argmax(dim=1)][:, None]
            scores["point"].extend(self._full_iou(best, feats, masks))
            box = np.stack([bounding_box(m) for m in masks]) * np.tile(scale, 2)
            t_box = torch.as_tensor(box, dtype=torch.float32, device=self.device)
            low, _ = self._decode(feats, None, None, t_box, None, False)
            scores["box"].extend(self._full_iou(low, feats, masks))
        if not scores["point"]:
            raise ValueError(f"the validation data hold no object of at least {cfg.min_object_pixels} pixels")
        point, box = float(np.mean(scores["point"])), float(np.mean(scores["box"]))
        return {"iou": (point + box) / 2, "point": point, "box": box, "objects": len(scores["point"])}

    def _full_iou(self, low: torch.Tensor, feats: _Features, masks: np.ndarray) -> list[float]:
        pred = self._upscale(low, feats)
        inter = (pred & masks).sum(axis=(1, 2))
        union = (pred | masks).sum(axis=(1, 2))
        return (inter / np.maximum(union, 1)).tolist()

    def run(self, until: int | None = None) -> Iterator[TrainingRecord]:
        """Train step by step, yielding a record after each.

        Parameters
        ----------
        until
            Stop once this many steps are done in total (``config.steps`` by default; a
            resumed trainer continues from where it stopped).

        Yields
        ------
        TrainingRecord
            With ``validation_iou`` set on the steps that validated.
        """
        cfg = self.config
        until = cfg.steps if until is None else int(until)
        while self.step < until:
            record = self.train_step()
            last = self.step == until or self.step == cfg.steps
            due = cfg.validate_every and (self.step % cfg.validate_every == 0 or last)
            if self.validation_data is not None and due:
                val = self.validate()
                record = dataclasses.replace(record, validation_iou=val["iou"], validation=val)
                self.history[-1]["validation_iou"] = val["iou"]
            yield record

    # -- checkpoints -------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """The configuration and training provenance written into checkpoints."""
        from .. import __version__

        history = self.history
        if len(history) > _MAX_HISTORY:
            stride = math.ceil(len(history) / _MAX_HISTORY)
            history = history[::stride] + ([history[-1]] if (len(history) - 1) % stride else [])
        recent = [h["loss"] for h in self.history[-20:]]
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config_to_dict(self.model.config),
            "training": {
                "mode": self.config.mode,
                "steps": self.step,
                "seed": self.config.seed,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "settings": self.config.to_dict(),
                "data": self.train_data.describe(),
                "validation_data": None if self.validation_data is None else self.validation_data.describe(),
                "base_model": self._base_model,
                "final_loss": float(np.mean(recent)) if recent else None,
                "losses": [dict(h) for h in history],
                "device": str(self.device),
                "torch": str(torch.__version__),
                "napari_sam": __version__,
            },
        }

    def save(self, path: PathLike, optimizer: bool = True) -> Path:
        """Write the model as a checkpoint that :func:`~napari_sam.core.models.load_model`
        reads, plus (with ``optimizer``) the optimizer state beside it for resuming.

        Parameters
        ----------
        path
            The checkpoint file (``.pth``).
        optimizer
            Also write :func:`optimizer_state_path` (tensors and plain values only).

        Returns
        -------
        pathlib.Path
            ``path``.
        """
        path = Path(path)
        # Floating tensors go out as float32 whatever precision the encoder ran in:
        # the file is the official format, which loaders cast as they need.
        state = {
            k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in self.model.state_dict().items()
        }
        write_checkpoint(path, state, self.metadata())
        if optimizer:
            target = optimizer_state_path(path)
            tmp = target.with_name(target.name + f".partial-{os.getpid()}")
            try:
                torch.save(
                    {"optimizer": self.optimizer.state_dict(), "step": self.step, "param_names": self._param_names},
                    tmp,
                )
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    tmp.unlink()
        return path

    @classmethod
    def resume(
        cls,
        path: PathLike,
        train_data: SegmentationDataset,
        validation_data: SegmentationDataset | None = None,
        config: TrainingConfig | None = None,
        device: str | torch.device | None = None,
    ) -> "Trainer":
        """Continue a run from a checkpoint written by :meth:`save`.

        The model, the step count, the loss history and (when its file is beside the
        checkpoint) the optimizer state are restored; the settings too, unless
        ``config`` replaces them (for instance with a larger ``steps``).

        Parameters
        ----------
        path
            The checkpoint.
        train_data, validation_data
            The data (not stored in checkpoints, only described).
        config
            Settings to use instead of the saved ones.
        device
            Where to train.

        Raises
        ------
        ValueError
            When the checkpoint holds no training metadata.
        """
        from .models import load_model

        checkpoint = read_checkpoint(path)
        meta = checkpoint.metadata
        training = meta.get("training")
        if not isinstance(training, Mapping) or "steps" not in training:
            raise ValueError(f"{os.fspath(path)} was not written by a Trainer: it holds no training metadata to resume")
        sam_config = config_from_dict(meta["config"]) if "config" in meta else infer_config(checkpoint.state_dict)
        inferred = infer_config(checkpoint.state_dict)
        if dataclasses.replace(inferred, name=sam_config.name) == sam_config:
            model = load_model(path, device="cpu", dtype="float32")
        else:
            # A configuration load_model cannot infer from the shapes (e.g. another input size).
            model = sam_from_state_dict(checkpoint.state_dict, sam_config)
            model.checkpoint_metadata = dict(meta)
        if config is None:
            config = TrainingConfig.from_dict(training["settings"])
        trainer = cls(model, train_data, config, validation_data, device)
        trainer.step = int(training["steps"])
        trainer.history = [dict(h) for h in training.get("losses", [])]
        if "base_model" in training:
            trainer._base_model = dict(training["base_model"])

        state_file = optimizer_state_path(path)
        if not state_file.is_file():
            warnings.warn(
                f"no optimizer state at {state_file}: training resumes with fresh AdamW moments",
                UserWarning,
                stacklevel=2,
            )
            return trainer
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        if state.get("param_names") != trainer._param_names or int(state.get("step", -1)) != trainer.step:
            warnings.warn(
                f"the optimizer state at {state_file} belongs to other trainable parameters or another step: "
                "training resumes with fresh AdamW moments",
                UserWarning,
                stacklevel=2,
            )
            return trainer
        trainer.optimizer.load_state_dict(state["optimizer"])
        return trainer


def train(
    model: Sam | PathLike,
    train_data: SegmentationDataset | PathLike,
    config: TrainingConfig | None = None,
    validation_data: SegmentationDataset | PathLike | None = None,
    checkpoint: PathLike | None = None,
    save_every: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Trainer:
    """Train with a tqdm progress bar and save the result.

    Parameters
    ----------
    model
        A :class:`Sam`, or a registry name or checkpoint path for
        :func:`~napari_sam.core.models.load_model`.
    train_data, validation_data
        Datasets, or folders for :meth:`SegmentationDataset.from_folder`.
    config
        Settings (:class:`TrainingConfig`).
    checkpoint
        Where to save the trained model (also every ``save_every`` steps); None: not saved.
    save_every
        Steps between intermediate saves; 0 only at the end.
    device
        Where to train.
    progress
        Show the progress bar.

    Returns
    -------
    Trainer
        After the last step, with its ``history``.
    """
    from tqdm.auto import tqdm

    from .models import load_model

    if not isinstance(model, Sam):
        model = load_model(model, device=device, dtype="float32")
    if not isinstance(train_data, SegmentationDataset):
        train_data = SegmentationDataset.from_folder(train_data)
    if validation_data is not None and not isinstance(validation_data, SegmentationDataset):
        validation_data = SegmentationDataset.from_folder(validation_data)
    trainer = Trainer(model, train_data, config, validation_data, device)
    with tqdm(total=trainer.config.steps, initial=trainer.step, disable=not progress, desc="training") as bar:
        for record in trainer.run():
            bar.update(1)
            post = {"loss": f"{record.loss:.4f}", "lr": f"{record.learning_rate:.2e}"}
            if record.validation_iou is not None:
                post["val_iou"] = f"{record.validation_iou:.3f}"
            bar.set_postfix(post)
            if checkpoint is not None and save_every and record.step % save_every == 0:
                trainer.save(checkpoint)
    if checkpoint is not None:
        trainer.save(checkpoint)
    return trainer
