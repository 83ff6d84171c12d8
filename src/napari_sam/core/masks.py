"""Binary masks: where an object sits in its plane, how two masks overlap, where to click
inside one, its box, and SAM's low-res logits brought back to pixels.

Every module that needs one of these ideas (prediction, tiled segmentation, propagation,
automatic segmentation, training, evaluation) calls them here, so that "IoU" or "the
deepest point" means the same thing everywhere.

Frames: masks are (H, W) arrays indexed (row, col); points leave this module as (x, y) =
(col, row) where the docstring says so, because that is what SAM's prompts take.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:  # pragma: no cover - metrics and geometry need no torch at run time
    import torch

__all__ = [
    "PlaneMask",
    "bounding_box",
    "deepest_pixel",
    "depth",
    "drop_fragments",
    "interior_points",
    "iou",
    "label_iou",
    "prompt_box",
    "region_iou",
    "upscale_logits",
]


@dataclass(frozen=True)
class PlaneMask:
    """An object's mask placed in its plane, stored as the crop of its bounding box.

    Attributes
    ----------
    region
        ``(y0, y1, x0, x1)`` of the crop in plane pixels (end exclusive); all zero for an
        empty mask.
    mask
        (y1 - y0, x1 - x0) bool.
    iou
        Predicted IoU of the first tile's answer.
    tiles
        Grid positions of the tiles that were asked, in order.
    complete
        False when the object reached further than the tiles allowed.
    logits
        Low-res logits of the first tile's answer (the mask prompt that refines this
        answer when more points are added: ``Prompt.previous``), or None.
    magnification
        The magnification of the embedding that answered (the frame of :attr:`logits`,
        so that a correction is answered on the same tiles), or None where no embedding
        did.
    """

    region: tuple[int, int, int, int]
    mask: np.ndarray
    iou: float
    tiles: tuple[tuple[int, int], ...]
    complete: bool = True
    logits: np.ndarray | None = field(default=None, repr=False, compare=False)
    magnification: float | None = None

    @property
    def slices(self) -> tuple[slice, slice]:
        """``plane[mask.slices]`` is the crop that :attr:`mask` covers."""
        y0, y1, x0, x1 = self.region
        return slice(y0, y1), slice(x0, x1)

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @classmethod
    def empty(cls, iou: float = 0.0, tiles: tuple[tuple[int, int], ...] = (), complete: bool = True) -> PlaneMask:
        """A mask without pixels."""
        return cls((0, 0, 0, 0), np.zeros((0, 0), bool), iou, tiles, complete)

    @classmethod
    def from_full(cls, mask: np.ndarray, iou: float = 1.0, offset: tuple[int, int] = (0, 0)) -> PlaneMask:
        """The PlaneMask of a bool array (whose origin lies at ``offset`` = (y, x) in the
        plane), cropped to its pixels; empty arrays give an empty PlaneMask."""
        mask = np.asarray(mask, bool)
        if not mask.any():
            return cls.empty(iou)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        oy, ox = offset
        return cls((y0 + oy, y1 + oy, x0 + ox, x1 + ox), mask[y0:y1, x0:x1], iou, ())

    def cropped(self) -> PlaneMask:
        """The same mask with its region shrunk to its pixels."""
        out = PlaneMask.from_full(self.mask, self.iou, (self.region[0], self.region[2]))
        return replace(self, region=out.region, mask=out.mask) if self.area else self

    def to_full(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask as a (H, W) bool array of the whole plane (for planes that fit memory)."""
        out = np.zeros(shape, bool)
        out[self.slices] = self.mask
        return out


# -- overlap ---------------------------------------------------------------------------------
def iou(a, b, empty: float = 0.0):
    """Intersection over union of masks, over their last two axes.

    Parameters
    ----------
    a, b
        (..., H, W) masks (anything that is true counts), broadcast against each other:
        numpy arrays, or torch tensors (training measures on the device, where its
        masks are).
    empty
        The value where both masks are empty: 0 where "nothing matched" is the honest
        answer (propagation), 1 where two empty answers agree (evaluation, training).

    Returns
    -------
    float, numpy.ndarray or torch.Tensor
        For numpy masks a float for two 2D masks, else an array of the leading shape;
        for tensors a float32 tensor of the leading shape.
    """
    if type(a).__module__.startswith("torch"):
        inter_t = (a.bool() & b.bool()).sum(dim=(-2, -1)).float()
        union_t = (a.bool() | b.bool()).sum(dim=(-2, -1)).float()
        return inter_t.new_tensor(empty).where(union_t == 0, inter_t / union_t.clamp(min=1))
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    inter = np.logical_and(a, b).sum(axis=(-2, -1))
    union = np.logical_or(a, b).sum(axis=(-2, -1))
    out = np.where(union > 0, inter / np.maximum(union, 1), empty)
    return float(out) if out.ndim == 0 else out


def region_iou(a: PlaneMask, b: PlaneMask) -> float:
    """IoU of two :class:`PlaneMask` of one plane (0 when both are empty), computed on the
    union of their regions only."""
    y0, y1 = min(a.region[0], b.region[0]), max(a.region[1], b.region[1])
    x0, x1 = min(a.region[2], b.region[2]), max(a.region[3], b.region[3])
    fa = np.zeros((y1 - y0, x1 - x0), bool)
    fb = np.zeros_like(fa)
    fa[a.region[0] - y0 : a.region[1] - y0, a.region[2] - x0 : a.region[3] - x0] = a.mask
    fb[b.region[0] - y0 : b.region[1] - y0, b.region[2] - x0 : b.region[3] - x0] = b.mask
    return float(iou(fa, fb))


def label_iou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every pair of objects of two label images of one shape (0 = background; ids
    need not be consecutive).

    Returns
    -------
    tuple
        Sorted ids of ``a``, sorted ids of ``b``, and the (len(ids_a), len(ids_b)) IoU
        matrix (0 for pairs that do not touch).
    """
    ids_a, area_a = np.unique(a[a > 0], return_counts=True)
    ids_b, area_b = np.unique(b[b > 0], return_counts=True)
    out = np.zeros((len(ids_a), len(ids_b)))
    both = (a > 0) & (b > 0)
    if both.any():
        pairs, inter = np.unique(np.stack([a[both].astype(np.int64), b[both].astype(np.int64)]), axis=1,
                                 return_counts=True)
        i, j = np.searchsorted(ids_a, pairs[0]), np.searchsorted(ids_b, pairs[1])
        out[i, j] = inter / (area_a[i] + area_b[j] - inter)
    return ids_a, ids_b, out


# -- inside a mask ---------------------------------------------------------------------------
def depth(mask: np.ndarray) -> np.ndarray:
    """Distance of every mask pixel to the nearest pixel outside it, the plane's edge
    counting as outside (a click hugging the border is as unnatural as one hugging the
    object's edge); 0 outside the mask.

    Parameters
    ----------
    mask
        (H, W) bool.

    Returns
    -------
    numpy.ndarray
        (H, W) float64.
    """
    mask = np.asarray(mask, bool)
    out = np.zeros(mask.shape)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return out
    # Everything beyond the bounding box is background, so the transform runs on that
    # crop (padded by one background pixel): the same distances, at the object's cost.
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    out[crop] = ndimage.distance_transform_edt(np.pad(mask[crop], 1))[1:-1, 1:-1]
    return out


def deepest_pixel(
    distances: np.ndarray, window: tuple[slice, slice] | None = None, rng: np.random.Generator | None = None
) -> tuple[int, int] | None:
    """(row, col) of the pixel with the largest :func:`depth`, or None where the mask
    does not reach into ``window``.

    Parameters
    ----------
    distances
        (H, W) output of :func:`depth`.
    window
        Look only inside these (row, col) slices (with starts); the whole plane when None.
    rng
        Breaks ties between equally deep pixels at random; the first in row-major order
        when None.
    """
    sub = distances if window is None else distances[window]
    top = sub.max(initial=0.0)
    if top <= 0:
        return None
    if rng is None:
        r, c = np.unravel_index(int(np.argmax(sub)), sub.shape)
    else:
        rr, cc = np.nonzero(sub == top)
        k = int(rng.integers(rr.size))
        r, c = rr[k], cc[k]
    r0, c0 = (0, 0) if window is None else (window[0].start or 0, window[1].start or 0)
    return int(r0 + r), int(c0 + c)


def interior_points(mask: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` points deep inside the mask and far apart: the deepest first, then the
    deepest outside the disc inscribed at each point already taken.

    Returns
    -------
    numpy.ndarray
        (k, 2) float64 (x, y) pixel centres, k <= n.
    """
    d = depth(mask)
    out = []
    yy, xx = np.ogrid[: d.shape[0], : d.shape[1]]
    for _ in range(n):
        pixel = deepest_pixel(d)
        if pixel is None:
            break
        y, x = pixel
        out.append((x + 0.5, y + 0.5))
        r = max(2.0, float(d[y, x]))
        d = np.where((yy - y) ** 2 + (xx - x) ** 2 <= r**2, 0, d)
    return np.array(out, dtype=np.float64).reshape(-1, 2)


# -- fragments -------------------------------------------------------------------------------
def drop_fragments(mask, points=None, labels=None, min_fraction: float = 0.1) -> np.ndarray:
    """The mask without its small detached pieces.

    SAM's mask for one object sometimes carries a few pixels elsewhere, often a sliver of
    a neighbour; committed, they would stay behind in that neighbour when it is labelled
    later (labels are never overwritten unless asked). Kept: every 8-connected piece that
    holds a foreground point, the largest piece, and every piece of at least
    ``min_fraction`` of the largest kept one, so that an object the user clicked in two
    places, or one that SAM sees in two large parts, stays whole.

    Parameters
    ----------
    mask
        (H, W) bool mask.
    points
        (N, 2) prompt points as (x, y) = (column, row) in the mask's pixels, or None.
    labels
        (N,) 1 foreground, 0 background (default: all foreground).
    min_fraction
        Pieces below this fraction of the largest kept piece, without a foreground point,
        are dropped.

    Returns
    -------
    numpy.ndarray
        (H, W) bool: the mask as a bool array, the very array given if it was one and
        nothing is dropped.
    """
    mask = np.asarray(mask, bool)
    pieces, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask
    areas = np.bincount(pieces.ravel(), minlength=n + 1)
    areas[0] = 0
    keep = np.zeros(n + 1, bool)
    keep[int(np.argmax(areas))] = True
    if points is not None and len(points):
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        fg = np.ones(len(pts), bool) if labels is None else np.asarray(labels).reshape(-1) == 1
        H, W = mask.shape
        for x, y in pts[fg]:
            r, c = int(round(y)), int(round(x))
            if 0 <= r < H and 0 <= c < W:
                keep[pieces[r, c]] = True
    keep[0] = False
    keep |= areas >= min_fraction * areas[keep].max()
    keep[0] = False
    return mask if keep[1:].all() else keep[pieces]


# -- boxes -----------------------------------------------------------------------------------
def bounding_box(mask) -> np.ndarray:
    """The mask's bounding box.

    Returns
    -------
    numpy.ndarray
        (4,) float64 ``(x0, y0, x1, y1)`` with x1 and y1 the last column and row (as SAM's
        training boxes).

    Raises
    ------
    ValueError
        For a mask that is not 2D or is empty.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2D (H, W) array, got shape {mask.shape}")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        raise ValueError("mask is empty: an object needs at least one foreground pixel")
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float64)


def prompt_box(mask) -> np.ndarray:
    """:func:`bounding_box`, one pixel wider where the object is one pixel thin, so that
    the box is valid as a prompt (x1 > x0, y1 > y0)."""
    H, W = np.shape(mask)
    box = bounding_box(mask)
    for lo, hi, size in ((0, 2, W), (1, 3, H)):
        if box[hi] <= box[lo]:
            if box[hi] + 1 < size:
                box[hi] += 1
            else:
                box[lo] -= 1
    return box


# -- logits ----------------------------------------------------------------------------------
def upscale_logits(model, low: torch.Tensor, input_size: tuple[int, int],
                   original_size: tuple[int, int], pixels: torch.Tensor | None = None) -> torch.Tensor:
    """SAM's low-res mask logits back at the plane's size (:meth:`Sam.postprocess_masks`).

    Parameters
    ----------
    model
        The Sam whose decoder produced the logits.
    low
        (..., S, S) logits in the model-input frame (S = 256 for SAM's 1024 input).
    input_size
        (h, w) of the resized plane inside the model input.
    original_size
        (H, W) of the plane.
    pixels
        (1, 3, S, S) the model input the logits were predicted on; with it, a model that
        has a :attr:`~napari_sam.model.sam.Sam.mask_refiner` sharpens each mask by the
        pixels in the model-input frame before the padding is cropped and the plane's
        size restored.

    Returns
    -------
    torch.Tensor
        (..., H, W) float logits on the model's device; ``> model.mask_threshold`` is the
        mask.
    """
    lead = low.shape[:-2]
    t = low.reshape(-1, 1, *low.shape[-2:]).to(model.device)
    refiner = getattr(model, "mask_refiner", None)
    if refiner is not None and pixels is not None:
        # refined at the model input's size, where bilinear enlargement is exact: the
        # second step of postprocess_masks (crop, resize) then acts on the refined logits
        t = refiner.refine_low_res(t.float(), pixels.to(model.device).float())
    full = model.postprocess_masks(t, input_size, original_size)
    return full.reshape(*lead, *full.shape[-2:])
