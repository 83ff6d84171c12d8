"""Following an object from one plane through its neighbours (along Z, or along T).

From the object's mask on a plane, the next plane is prompted with what that mask tells:

* a **box** around it, grown by ``box_margin`` of its size (objects change size from
  slice to slice);
* **interior points**: the pixel farthest from the boundary, which survives small shifts;
* the **low-res logits** of the previous answer as a mask prompt, when the plane is a
  single tile (the logits live in the tile's frame; across tiles they would not line up).

The answer becomes the prompt of the plane after, in both directions from the start,
until the object ends: its mask vanishes (fewer than ``min_area`` pixels), SAM's predicted
IoU drops below ``min_predicted_iou``, or the mask overlaps the previous one by less than
``min_consecutive_iou`` (a jump to another object). Each plane's result is reported as
soon as it is known, so a caller can write it and stop at any point with consistent
labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .tiled_segmentation import PlaneMask

__all__ = ["PropagationSettings", "PropagationStep", "propagate"]


@dataclass(frozen=True)
class PropagationSettings:
    """How a mask is carried to the next plane and when propagation stops.

    Parameters
    ----------
    use_box, use_points, use_mask
        Which prompts come from the previous plane's answer (see the module docstring).
    points
        Interior points taken from the previous mask (the deepest first, then the deepest
        ones far from those already taken).
    box_margin
        The box grows by this fraction of its width and height on each side.
    min_area
        Fewer pixels than this: the object has ended.
    min_predicted_iou
        SAM's predicted IoU below this: the answer is not trusted and propagation stops.
    min_consecutive_iou
        IoU with the previous plane's mask below this: the answer jumped elsewhere.
    max_planes
        Planes at most in each direction (None: until the image ends).
    """

    use_box: bool = True
    use_points: bool = True
    use_mask: bool = True
    points: int = 1
    box_margin: float = 0.1
    min_area: int = 10
    min_predicted_iou: float = 0.5
    min_consecutive_iou: float = 0.3
    max_planes: int | None = None

    def __post_init__(self):
        if not (self.use_box or self.use_points):
            raise ValueError("propagation needs a box or points from the previous plane (use_box or use_points)")
        if self.points < 1 and self.use_points:
            raise ValueError("points must be at least 1 when use_points is set")
        if not 0 <= self.min_consecutive_iou <= 1 or not 0 <= self.min_predicted_iou <= 1:
            raise ValueError("IoU thresholds lie between 0 and 1")


@dataclass(frozen=True)
class PropagationStep:
    """One plane's result.

    Attributes
    ----------
    plane
        Plane index (tuple over the image's plane axes).
    mask
        The object on that plane, or None where propagation stopped.
    predicted_iou
        SAM's predicted IoU of the answer.
    consecutive_iou
        IoU with the previous plane's mask.
    stopped
        Why propagation stopped on this plane ("" while it goes on).
    done, total
        Planes visited so far, and the most that can be visited.
    """

    plane: tuple[int, ...]
    mask: PlaneMask | None
    predicted_iou: float
    consecutive_iou: float
    stopped: str = ""
    done: int = 0
    total: int = 0


def _interior_points(mask: np.ndarray, n: int) -> np.ndarray:
    """(n, 2) (x, y) crop pixels deep inside the mask and far apart."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    out = []
    for _ in range(n):
        if depth.max() <= 0:
            break
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
        out.append((x + 0.5, y + 0.5))
        # suppress the inscribed disc so that the next point lies elsewhere in the object
        r = max(2.0, float(depth[y, x]))
        yy, xx = np.ogrid[: depth.shape[0], : depth.shape[1]]
        depth = np.where((yy - y) ** 2 + (xx - x) ** 2 <= r**2, 0, depth)
    return np.array(out, dtype=np.float64).reshape(-1, 2)


def _iou(a: PlaneMask, b: PlaneMask) -> float:
    y0, y1 = min(a.region[0], b.region[0]), max(a.region[1], b.region[1])
    x0, x1 = min(a.region[2], b.region[2]), max(a.region[3], b.region[3])
    fa = np.zeros((y1 - y0, x1 - x0), bool)
    fb = np.zeros_like(fa)
    fa[a.region[0] - y0 : a.region[1] - y0, a.region[2] - x0 : a.region[3] - x0] = a.mask
    fb[b.region[0] - y0 : b.region[1] - y0, b.region[2] - x0 : b.region[3] - x0] = b.mask
    union = np.logical_or(fa, fb).sum()
    return float(np.logical_and(fa, fb).sum() / union) if union else 0.0


def _prompts(mask: PlaneMask, settings: PropagationSettings, shape: tuple[int, int]) -> dict:
    y0, y1, x0, x1 = mask.region
    H, W = shape
    out: dict = {}
    if settings.use_box:
        my, mx = settings.box_margin * (y1 - y0), settings.box_margin * (x1 - x0)
        out["box"] = np.array([max(0, x0 - mx), max(0, y0 - my), min(W, x1 + mx), min(H, y1 + my)])
    if settings.use_points:
        pts = _interior_points(mask.mask, settings.points) + (x0, y0)
        out["points"], out["labels"] = pts, np.ones(len(pts), np.int64)
    return out


def propagate(embeddings, start, mask: PlaneMask, axis: str | None = None, settings: PropagationSettings = PropagationSettings(),
              directions: tuple[int, ...] = (1, -1)) -> Iterator[PropagationStep]:
    """Carry an object from plane ``start`` through the neighbouring planes.

    Parameters
    ----------
    embeddings
        :class:`~napari_sam.core.embeddings.Embeddings` of the image (missing tiles are
        embedded on the way).
    start
        The plane the object is known on (flat number or tuple over the plane axes).
    mask
        Its mask there.
    axis
        The plane axis to follow, ``"Z"`` or ``"T"``; by default the innermost one.
    settings
        Prompts and stopping rules.
    directions
        +1 (increasing index), -1, or both (default), one after the other.

    Yields
    ------
    PropagationStep
        One per plane visited; the last of each direction has ``stopped`` set (unless the
        image ended) and ``mask`` None when the answer was rejected.
    """
    source = embeddings.source
    if not source.plane_axes:
        raise ValueError("a 2D image has no planes to propagate through")
    axis = (axis or source.plane_axes[-1]).upper()
    if axis not in source.plane_axes:
        raise ValueError(f"axis {axis!r} is not a plane axis of this image (its plane axes are {source.plane_axes!r})")
    k = source.plane_axes.index(axis)
    start = source.plane_index(start)
    n = source.plane_grid[k]
    limit = settings.max_planes or n
    total = sum(min(limit, (n - 1 - start[k]) if d > 0 else start[k]) for d in directions)
    done = 0
    first = mask.cropped()
    if first.area < settings.min_area:
        raise ValueError(f"the starting mask has {first.area} pixel(s), fewer than min_area={settings.min_area}")
    for direction in directions:
        previous, logits = first, None
        for step in range(1, limit + 1):
            index = start[k] + direction * step
            if not 0 <= index < n:
                break
            plane = start[:k] + (index,) + start[k + 1 :]
            answer, iou, logits = _answer(embeddings, plane, previous, logits, settings)
            done += 1
            overlap = _iou(answer, previous) if answer.area else 0.0
            reason = ""
            if answer.area < settings.min_area:
                reason = "the object ended (mask vanished)"
            elif iou < settings.min_predicted_iou:
                reason = f"predicted IoU {iou:.2f} < {settings.min_predicted_iou}"
            elif overlap < settings.min_consecutive_iou:
                reason = f"IoU with the previous plane {overlap:.2f} < {settings.min_consecutive_iou}"
            if reason:
                yield PropagationStep(plane, None, iou, overlap, reason, done, total)
                break
            yield PropagationStep(plane, answer, iou, overlap, "", done, total)
            previous = answer


def _answer(embeddings, plane, previous: PlaneMask, logits, settings: PropagationSettings):
    """The object on ``plane`` from the previous answer: (mask, predicted IoU, logits)."""
    shape = embeddings.source.plane_shape
    prompts = _prompts(previous, settings, shape)
    if len(embeddings.grid) == 1:
        # One tile: answer directly, so that the low-res logits can be fed back.
        result = embeddings.predict(
            plane, (0, 0), points=prompts.get("points"), labels=prompts.get("labels"), box=prompts.get("box"),
            mask_input=logits if settings.use_mask else None, multimask=False,
        )
        full = result.masks[0]
        mask = PlaneMask.from_full(full, float(result.iou[0]))
        return mask, float(result.iou[0]), result.low_res_logits[0]
    answer = embeddings.segment(plane, prompts.get("points"), prompts.get("labels"), prompts.get("box"), multimask=False)
    return answer.cropped(), float(answer.iou), None
