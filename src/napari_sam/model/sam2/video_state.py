"""What a SAM 2 video session keeps per object, how click and box prompts enter it, and
the two post-processing rules of its results: hole filling and non-overlapping objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .tracking import ObjectMemory

__all__ = ["ObjectState", "fill_holes", "non_overlapping", "prompt_points"]


@dataclass
class ObjectState:
    """One object of a video session.

    points : frame -> ((1, N, 2) (x, y) in the model-input frame, (1, N) labels)
    masks : frame -> (1, 1, S, S) mask prompt
    output : the object's memory (results merged when propagation starts)
    temp : results of prompts given since the last propagation, not yet in memory
    tracked : frame -> whether propagation reached it in reverse
    """

    points: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    masks: dict[int, torch.Tensor] = field(default_factory=dict)
    output: ObjectMemory = field(default_factory=ObjectMemory)
    temp: ObjectMemory = field(default_factory=ObjectMemory)
    tracked: dict[int, bool] = field(default_factory=dict)


def prompt_points(points: Any, labels: Any, box: Any, clear_old: bool, video_size: tuple[int, int],
                  image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clicks and a box in original-frame pixels as the decoder's point prompt.

    Parameters
    ----------
    points, labels
        (N, 2) (x, y) pixels and (N,) labels, 1 object, 0 background; both or neither.
    box
        (4,) (x0, y0, x1, y1) pixels, or None; only with ``clear_old``.
    video_size
        (H, W) of the original frames.
    image_size
        Side S of the square model input.

    Returns
    -------
    coords : (1, N', 2) float32 (x, y) in the S x S model-input frame, the box corners first
    labels : (1, N') int32, 2 and 3 for the box corners
    """
    if (points is None) != (labels is None):
        raise ValueError("points and labels must be given together")
    if points is None and box is None:
        raise ValueError("give points and labels, a box, or both")
    H, W = video_size
    coords = torch.zeros(0, 2)
    lab = torch.zeros(0, dtype=torch.int32)
    if points is not None:
        coords = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
        lab = torch.as_tensor(labels).reshape(-1).to(torch.int32)
        if coords.shape[0] != lab.shape[0]:
            raise ValueError(f"{coords.shape[0]} points but {lab.shape[0]} labels")
        if ((lab != 0) & (lab != 1)).any():
            raise ValueError(f"labels must be 1 (object) or 0 (background), got {sorted(set(lab.tolist()))}")
    if box is not None:
        if not clear_old:
            raise ValueError("a box replaces the frame's prompts: use clear_old=True")
        corners = torch.as_tensor(box, dtype=torch.float32).reshape(-1)
        if corners.numel() != 4:
            raise ValueError(f"box must be (x0, y0, x1, y1), not {corners.numel()} values")
        coords = torch.cat([corners.reshape(2, 2), coords])
        lab = torch.cat([torch.tensor([2, 3], dtype=torch.int32), lab])
    if not torch.isfinite(coords).all():
        raise ValueError("points and box must be finite")
    # as the official: normalise by the frame size, then scale to the model input
    coords = coords / torch.tensor([float(W), float(H)]) * image_size
    return coords[None], lab[None]


def _components(region: torch.Tensor) -> torch.Tensor:
    """8-connected components of a (B, 1, h, w) bool region: (B, 1, h, w) int64 labels,
    0 outside, else one past the largest flat index of the component's pixels."""
    B, _, h, w = region.shape
    n = h * w
    index = torch.arange(1, n + 1, device=region.device, dtype=torch.float64).reshape(1, 1, h, w)
    # float64 holds every index exactly and max-pooling knows it
    labels = torch.where(region, index, 0.0)
    while True:
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * region
        # pointer jumping: take the label of the pixel a label names (same component,
        # larger or equal label), which shortens long chains to a few rounds
        flat = grown.reshape(B, n)
        jumped = torch.gather(flat, 1, (flat.long() - 1).clamp(min=0)) * (flat > 0)
        jumped = torch.maximum(jumped, flat).reshape(B, 1, h, w)
        if torch.equal(jumped, labels):
            return labels.long()
        labels = jumped


def fill_holes(mask_logits: torch.Tensor, max_area: int) -> torch.Tensor:
    """Turn small background regions into foreground (the official ``fill_holes_in_mask_scores``).

    Parameters
    ----------
    mask_logits
        (B, 1, h, w) logits; background is ``<= 0``.
    max_area
        Background regions (8-connected) of at most this many pixels get logit 0.1.

    Returns
    -------
    (B, 1, h, w) logits.
    """
    if max_area <= 0:
        raise ValueError(f"max_area must be positive, not {max_area}")
    background = mask_logits <= 0
    labels = _components(background)
    B, _, h, w = labels.shape
    # one count per (image, label): offset every image's labels
    offset = torch.arange(B, device=labels.device).reshape(B, 1, 1, 1) * (h * w + 1)
    keyed = (labels + offset).flatten()
    areas = torch.bincount(keyed, minlength=B * (h * w + 1))[keyed].reshape(labels.shape)
    hole = background & (areas <= max_area)
    return torch.where(hole, torch.full_like(mask_logits, 0.1), mask_logits)


def non_overlapping(logits: torch.Tensor) -> torch.Tensor:
    """(O, 1, H, W) objects' logits, each pixel left to the highest-scoring object: the
    others are clamped to at most -10 there (the official non-overlap constraint)."""
    if logits.shape[0] == 1:
        return logits
    best = logits.argmax(dim=0, keepdim=True)
    keep = best == torch.arange(logits.shape[0], device=logits.device).reshape(-1, 1, 1, 1)
    return torch.where(keep, logits, logits.clamp(max=-10.0))
