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

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .masks import PlaneMask, interior_points, region_iou
from .prompts import Prompt

__all__ = ["PropagationSettings", "PropagationStep", "next_prompt", "propagate"]


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


def next_prompt(mask: PlaneMask, settings: PropagationSettings, shape: tuple[int, int]) -> Prompt:
    """The prompt that an object's mask on one plane gives the next plane: its box grown
    by ``box_margin`` (clipped to the (H, W) plane) and its deepest interior points, as
    ``settings`` choose. The previous answer's logits are added by :func:`propagate`
    where they apply."""
    y0, y1, x0, x1 = mask.region
    H, W = shape
    box = points = None
    if settings.use_box:
        my, mx = settings.box_margin * (y1 - y0), settings.box_margin * (x1 - x0)
        box = np.array([max(0, x0 - mx), max(0, y0 - my), min(W, x1 + mx), min(H, y1 + my)])
    if settings.use_points:
        points = interior_points(mask.mask, settings.points) + (x0, y0)
    return Prompt.make(points, None, box)


def propagate(embeddings, start, mask: PlaneMask, axis: str | None = None,
              settings: PropagationSettings = PropagationSettings(),
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
    # The start is the user's mask, not a decoder answer: it has no logits to refine.
    first = dataclasses.replace(mask.cropped(), logits=None)
    if first.area < settings.min_area:
        raise ValueError(f"the starting mask has {first.area} pixel(s), fewer than min_area={settings.min_area}")
    for direction in directions:
        previous = first
        for step in range(1, limit + 1):
            index = start[k] + direction * step
            if not 0 <= index < n:
                break
            plane = start[:k] + (index,) + start[k + 1 :]
            answer = _answer(embeddings, plane, previous, settings)
            iou = answer.iou
            done += 1
            overlap = region_iou(answer, previous) if answer.area else 0.0
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


def _answer(embeddings, plane, previous: PlaneMask, settings: PropagationSettings) -> PlaneMask:
    """The object on ``plane`` from its answer on the plane before."""
    prompt = next_prompt(previous, settings, embeddings.source.plane_shape)
    if settings.use_mask and len(embeddings.grid) == 1:
        # The logits live in a tile's frame: fed back only where the plane is one tile.
        prompt = dataclasses.replace(prompt, previous=previous)
    return embeddings.segment(plane, prompt, multimask=False).cropped()
