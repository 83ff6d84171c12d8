"""Candidate masks and what decides which of them become objects.

Both automatic modes end the same way: SAM proposes candidate masks (several per prompt
in grid mode), candidates are scored (:func:`stability_score`), duplicates are removed
(:func:`box_nms`), masks are cleaned of small holes and islands (:func:`clean_mask`), and
the survivors are painted into one label image without overlaps
(:func:`masks_to_labels`).

Candidates are kept as crops of the plane, ``region`` = (y0, y1, x0, x1) in (row, col)
pixels, end exclusive, so that a large plane never holds one full-size array per
candidate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.masks import PlaneMask
from .results import AutomaticResult

__all__ = ["Candidate", "box_nms", "clean_mask", "cleaned_candidates", "masks_to_labels", "nms_candidates",
           "stability_score"]


@dataclass
class Candidate:
    """A mask as a crop of the plane: ``region`` is (y0, y1, x0, x1)."""

    region: tuple[int, int, int, int]
    mask: np.ndarray
    iou: float
    stability: float = float("nan")
    area: int = field(init=False)

    def __post_init__(self):
        self.area = int(self.mask.sum())

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) pixel extent, end exclusive."""
        y0, y1, x0, x1 = self.region
        return x0, y0, x1, y1

    @classmethod
    def of(
        cls, mask: np.ndarray, offset: tuple[int, int], iou: float, stability: float = math.nan
    ) -> Candidate | None:
        """The candidate of a bool mask whose origin lies at ``offset`` = (y, x) in the
        plane, cropped to its pixels; None for an empty mask.

        The crop is copied so that the larger array it was cut from can be freed.
        """
        placed = PlaneMask.from_full(mask, offset=offset)
        if not placed.area:
            return None
        return cls(placed.region, placed.mask.copy(), iou, stability)


def box_nms(boxes, scores, iou_threshold: float = 0.7) -> np.ndarray:
    """Greedy non-maximum suppression of boxes.

    The highest-scoring box is kept, every remaining box overlapping it with an IoU above
    ``iou_threshold`` is dropped, and so on. Equal scores keep the earlier box.

    Parameters
    ----------
    boxes
        (N, 4) as (x0, y0, x1, y1); area is ``(x1 - x0) * (y1 - y0)`` (use end-exclusive
        pixel extents for masks).
    scores
        (N,) higher is better.
    iou_threshold
        Boxes overlapping a kept one by more than this are suppressed.

    Returns
    -------
    numpy.ndarray
        Indices of the kept boxes, best first.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if np.size(boxes) else np.zeros((0, 4))
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
    if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
        raise ValueError("boxes must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = w * h
        union = area[i] + area[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def stability_score(logits, offset: float = 1.0, threshold: float = 0.0) -> np.ndarray:
    """How little a mask changes when its logit threshold moves: the IoU of the mask
    thresholded at ``threshold + offset`` with the one thresholded at ``threshold - offset``.

    The first is contained in the second, so the IoU is a ratio of pixel counts. A mask
    with sharp edges scores near 1; a blurry one, whose extent depends on the threshold,
    scores low.

    Parameters
    ----------
    logits
        (..., H, W) mask logits.
    offset
        Logit offset (SAM: 1.0).
    threshold
        The mask threshold (0 for SAM).

    Returns
    -------
    numpy.ndarray
        (...) scores in [0, 1]; 1 for a mask that is empty at both thresholds.
    """
    t = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    if t.ndim < 2:
        raise ValueError(f"logits must have at least 2 dimensions (H, W), got shape {tuple(t.shape)}")
    inner = (t > threshold + offset).sum(dim=(-2, -1), dtype=torch.int64)
    outer = (t > threshold - offset).sum(dim=(-2, -1), dtype=torch.int64)
    ratio = inner.double() / outer.clamp(min=1).double()
    score = torch.where(outer > 0, ratio, torch.ones_like(ratio))
    return score.numpy()


def _remove_small(mask: np.ndarray, min_area: int, holes: bool) -> np.ndarray:
    """skimage's remove_small_holes / remove_small_objects for areas below ``min_area``
    (the keyword changed from ``min_size`` / ``area_threshold`` to ``max_size`` in
    scikit-image 0.26; both are supported)."""
    from skimage.morphology import remove_small_holes, remove_small_objects

    fn = remove_small_holes if holes else remove_small_objects
    try:
        return fn(mask, max_size=min_area - 1)  # removes areas <= max_size
    except TypeError:
        return fn(mask, min_area)  # older: removes areas < min_size / area_threshold


def clean_mask(mask, min_area: int) -> np.ndarray:
    """Fill holes and remove islands smaller than ``min_area`` pixels.

    Parameters
    ----------
    mask
        (H, W) bool.
    min_area
        Holes and islands of fewer pixels go; 0 or 1 leaves the mask as it is.

    Returns
    -------
    numpy.ndarray
        (H, W) bool, a new array.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D (H, W), got shape {mask.shape}")
    if min_area <= 1 or not mask.any():
        return mask.copy()
    return _remove_small(_remove_small(mask, min_area, holes=True), min_area, holes=False)


def nms_candidates(candidates: list[Candidate], iou_threshold: float) -> list[Candidate]:
    """The candidates :func:`box_nms` keeps (by predicted IoU), best first."""
    if not candidates:
        return []
    keep = box_nms([c.box for c in candidates], [c.iou for c in candidates], iou_threshold)
    return [candidates[i] for i in keep]


def cleaned_candidates(candidates: list[Candidate], min_area: int) -> list[Candidate]:
    """Every candidate through :func:`clean_mask`, re-cropped; those left smaller than
    ``min_area`` (or empty) are dropped."""
    out = []
    for c in candidates:
        cleaned = Candidate.of(clean_mask(c.mask, min_area), (c.region[0], c.region[2]), c.iou, c.stability)
        if cleaned is None or cleaned.area < max(min_area, 1):
            continue
        out.append(cleaned)
    return out


def masks_to_labels(shape: tuple[int, int], candidates: Sequence[Candidate], min_area: int = 0) -> AutomaticResult:
    """Paint object masks into one label image without overlaps.

    Larger objects are painted first and smaller ones over them (as micro-sam does), so
    an object lying on a larger one stays whole and the larger one loses those pixels;
    objects left with fewer than ``min_area`` pixels (or none) are dropped, and ids are
    renumbered 1..n from the largest object down.
    """
    labels = np.zeros(shape, np.uint32)
    order = sorted(range(len(candidates)), key=lambda i: -candidates[i].area)
    for k, i in enumerate(order, start=1):
        c = candidates[i]
        y0, y1, x0, x1 = c.region
        labels[y0:y1, x0:x1][c.mask] = k
    area = np.bincount(labels.ravel(), minlength=len(order) + 1)[1:]
    survivors = [k for k in range(1, len(order) + 1) if area[k - 1] > 0 and area[k - 1] >= max(min_area, 1)]
    lut = np.zeros(len(order) + 1, np.uint32)
    lut[survivors] = np.arange(1, len(survivors) + 1, dtype=np.uint32)
    labels = lut[labels]
    kept = [candidates[order[k - 1]] for k in survivors]
    return AutomaticResult(
        labels=labels,
        iou=np.array([c.iou for c in kept], dtype=np.float64),
        stability=np.array([c.stability for c in kept], dtype=np.float64),
        area=np.array([area[k - 1] for k in survivors], dtype=np.int64),
    )
