"""Propagating objects through Z or T with SAM 2's memory.

Where :mod:`~napari_sam.core.propagation` re-prompts SAM plane by plane, SAM 2 carries an
object from the planes where it is known (its *prompted planes*: masks the user drew or
committed) through the others with its memory: every plane it has segmented is encoded
into a memory bank that conditions the next one, beside the prompted planes themselves
and the object pointers. :func:`propagate_objects` drives one
:class:`~napari_sam.model.sam2.video.Sam2Video` session per window and group of objects:

* **Several objects at once.** Objects with the same prompted planes share a session when
  one window holds them (:meth:`~napari_sam.core.windows.WindowGrid.cover`).
* **Both directions from each prompted plane.** A prompted plane propagates up and down
  the axis until the object ends, the image ends or half way to the object's next
  prompted plane (which owns the other half), all prompted planes being conditioning
  frames of the session. A correction is one more prompted plane: propagating from it
  (``starts``) rewrites the planes it owns and nothing else.
* **The object's end.** SAM 2 scores whether the object is present and empties the mask
  when it is not; ``stop_after`` planes in a row without the object (fewer than
  ``min_area`` pixels) end it in that direction.
* **Windows.** A plane larger than the model input is propagated on a window of S native
  pixels around the object (:mod:`~napari_sam.core.windows`). When the object nears an
  inner edge of its window, a new session starts on the window centred on it, seeded with
  the last mask: the memory bank is per window. Planes no larger than S are seen whole,
  squashed to S x S as the official predictors do.

Each plane's result is yielded as soon as it is known (:class:`MemoryStep`), so that a
caller can write it and stop at any point with consistent labels; features come from a
:class:`~napari_sam.core.sam2_features.Sam2Features` cache, so running again costs no
encoder time.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Collection, Generator, Mapping
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from .masks import PlaneMask
from .sam2_features import Sam2Features
from .windows import Window

__all__ = ["MemorySettings", "MemoryStep", "propagate_objects", "territory"]

_NO_IOU = float("nan")  # SAM 2 scores whether the object is present, not a mask IoU


@dataclass(frozen=True)
class MemorySettings:
    """When an object ends, and how far propagation goes.

    Parameters
    ----------
    stop_after
        Planes in a row without the object that end it in a direction. Real objects have
        no gaps along Z (none in the 54 GoNuclear nuclei, nor in the 51 of StarDist's 3D
        sample), so two planes in a row cost no truth and let SAM 2 miss an object on one
        plane (its presence score dipping) without ending it; each end costs one plane more.
    min_area
        A mask of fewer pixels counts as no object. Kept small: 32 of the 108 end planes of
        the GoNuclear nuclei hold fewer than 10 pixels.
    max_planes
        Planes at most in each direction from a prompted plane (None: no limit).
    threshold
        Logit above which a pixel belongs to the object.
    """

    stop_after: int = 2
    min_area: int = 1
    max_planes: int | None = None
    threshold: float = 0.0

    def __post_init__(self):
        if self.stop_after < 1:
            raise ValueError(f"stop_after must be at least 1, not {self.stop_after}")
        if self.min_area < 1:
            raise ValueError(f"min_area must be at least 1, not {self.min_area}")
        if self.max_planes is not None and self.max_planes < 1:
            raise ValueError(f"max_planes must be at least 1 (or None), not {self.max_planes}")


@dataclass(frozen=True)
class MemoryStep:
    """One plane's result for the objects of one session.

    Attributes
    ----------
    plane
        Plane index (tuple over the image's plane axes).
    masks
        Object id -> its mask on that plane (cropped, plane coordinates), for the objects
        found there; an object of the session that is missing has no entry.
    ended
        Objects that ended on this plane in this direction.
    gone
        Object id -> the planes it was decided absent from at this step: this plane for
        a miss, this plane and the rest of its way in this direction when it ended. Its
        earlier pixels there are no longer its (a correction that ends an object sooner).
    window
        ``(y0, y1, x0, x1)`` of the window the session sees.
    done, total
        Object-planes decided so far, and all there are to decide.
    """

    plane: tuple[int, ...]
    masks: Mapping[int, PlaneMask]
    ended: tuple[int, ...] = ()
    gone: Mapping[int, tuple[tuple[int, ...], ...]] = field(default_factory=dict)
    window: tuple[int, int, int, int] = (0, 0, 0, 0)
    done: int = 0
    total: int = 0

    @property
    def stopped(self) -> str:
        """Why objects stopped on this plane, in words ("" while they go on)."""
        if not self.ended:
            return ""
        return f"object{'s' if len(self.ended) > 1 else ''} {', '.join(map(str, self.ended))} ended"


def territory(prompted: Collection[int], start: int, n: int, max_planes: int | None = None) -> tuple[int, int]:
    """The frames (first, last; inclusive) that prompted frame ``start`` propagates to:
    both ways until the image ends or half way to the nearest other prompted frame (the
    lower half to the lower frame), at most ``max_planes`` each way."""
    below = [p for p in prompted if p < start]
    above = [p for p in prompted if p > start]
    lo = (max(below) + start) // 2 + 1 if below else 0
    hi = (min(above) + start) // 2 if above else n - 1
    if max_planes is not None:
        lo, hi = max(lo, start - max_planes), min(hi, start + max_planes)
    return lo, hi


@dataclass
class _Run:
    """One session's work: objects in a window, from a frame, in one or two directions."""

    window: Window
    ids: list[int]
    cond: dict[int, dict[int, PlaneMask]]  # object -> frame -> mask, the session's conditioning frames
    start: int
    ends: list[tuple[int, int]] = field(default_factory=list)  # (direction, last frame)


def propagate_objects(features: Sam2Features, objects: Mapping[int, Mapping[tuple[int, ...], PlaneMask]],
                      axis: str | None = None, settings: MemorySettings = MemorySettings(),
                      starts: Mapping[int, Collection[tuple[int, ...]]] | None = None
                      ) -> Generator[MemoryStep, None, None]:
    """Carry objects from their prompted planes through their neighbours with SAM 2.

    Parameters
    ----------
    features
        The image's SAM 2 features (missing ones are computed on the way).
    objects
        Object id -> {plane: its mask there}: the prompted planes (flat numbers or tuples
        over the plane axes; the masks in plane coordinates). An object's planes differ
        only along ``axis``.
    axis
        ``"Z"`` or ``"T"``; by default the innermost plane axis.
    settings
        The stopping rules.
    starts
        Object id -> the prompted planes to propagate from (a correction: only the planes
        it owns are rewritten; objects not named are not propagated); None: every object
        from all of its prompted planes.

    Yields
    ------
    MemoryStep
        One per plane and session, in the order they are computed. Closing the generator
        stops at once.

    Raises
    ------
    ValueError
        No objects, an empty mask, a start that is not a prompted plane, an axis the image
        does not have.
    """
    source = features.source
    if not source.plane_axes:
        raise ValueError("a 2D image has no planes to propagate through")
    axis = (axis or source.plane_axes[-1]).upper()
    if axis not in source.plane_axes:
        raise ValueError(f"axis {axis!r} is not a plane axis of this image (its plane axes are {source.plane_axes!r})")
    k = source.plane_axes.index(axis)
    n = source.plane_grid[k]
    # One stack per index of the other plane axes (each time point of a TZYX image followed
    # along Z): an id prompted in several stacks (one nucleus labelled at two time points) is
    # followed in each from its own prompted planes.
    stacks: dict[tuple[int, ...], dict[int, dict[int, PlaneMask]]] = {}
    for oid, prompted in objects.items():
        if not prompted:
            raise ValueError(f"object {oid} has no prompted plane")
        for plane, mask in prompted.items():
            index = source.plane_index(plane)
            if not mask.area:
                raise ValueError(f"object {oid} has an empty mask on plane {index}")
            stacks.setdefault(index[:k] + index[k + 1:], {}).setdefault(int(oid), {})[index[k]] = mask.cropped()
        for plane in (starts or {}).get(oid, ()):
            if source.plane_index(plane) not in {source.plane_index(p) for p in prompted}:
                raise ValueError(f"object {oid} was not prompted on plane {source.plane_index(plane)}: propagation "
                                 f"starts from a prompted plane")
    if not stacks:
        raise ValueError("no objects to propagate")
    runs = {outer: _runs(features, group, n, settings, starts, source, k, outer) for outer, group in stacks.items()}
    total = sum(abs(last - run.start) * len(run.ids) for todo in runs.values() for run in todo for _, last in run.ends)
    progress = [0, total]
    for outer, todo in runs.items():
        planes = [outer[:k] + (i,) + outer[k:] for i in range(n)]
        queue = deque(todo)
        while queue:
            queue.extendleft(reversed((yield from _session(features, queue.popleft(), planes, settings, progress))))


def _runs(features, group, n, settings, starts, source, k, outer) -> list[_Run]:
    """The sessions of one stack: objects with the same prompted frames and start, by window."""
    by_start: dict[tuple[frozenset[int], int], list[int]] = {}
    for oid, cond in group.items():
        chosen = set(cond) if starts is None else set()
        if starts is not None:
            for plane in starts.get(oid, ()):
                index = source.plane_index(plane)
                if index[:k] + index[k + 1:] == outer:  # a start in another stack is that stack's (checked above)
                    chosen.add(index[k])
        for f in sorted(chosen):
            by_start.setdefault((frozenset(cond), f), []).append(oid)
    runs = []
    for (prompted, f), ids in sorted(by_start.items(), key=lambda item: (item[0][1], item[1])):
        lo, hi = territory(prompted, f, n, settings.max_planes)
        for window, taken in features.windows.cover([group[i][f].region for i in ids]):
            run = _Run(window, [ids[i] for i in taken], {ids[i]: group[ids[i]] for i in taken}, f)
            run.ends = [(d, last) for d, last in ((1, hi), (-1, lo)) if last != f]
            if run.ends:
                runs.append(run)
    return runs


def _crop(mask: PlaneMask, window: Window) -> np.ndarray:
    """The mask as a bool array of the window's pixels."""
    out = np.zeros(window.shape, bool)
    y0, y1, x0, x1 = mask.region
    wy, _, wx, _ = window.region
    H, W = window.shape
    a0, a1, b0, b1 = max(y0, wy), min(y1, wy + H), max(x0, wx), min(x1, wx + W)
    if a0 < a1 and b0 < b1:
        out[a0 - wy : a1 - wy, b0 - wx : b1 - wx] = mask.mask[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
    return out


def _session(features: Sam2Features, run: _Run, planes: list[tuple[int, ...]], settings: MemorySettings,
             progress: list[int]):
    """Run one session; yields steps, returns the runs of the objects that moved to other windows."""
    from ..model.sam2.video import Sam2Video

    window, grid = run.window, features.windows
    video = Sam2Video(features.model, features.frames(planes, window), num_frames=len(planes),
                      video_size=window.shape)
    for oid in run.ids:
        for f, mask in sorted(run.cond[oid].items()):
            crop = _crop(mask, window)
            if crop.any():
                video.add_mask(f, oid, torch.from_numpy(crop))
    moved: list[_Run] = []
    for direction, last in run.ends:
        span = abs(last - run.start)
        live, misses = set(run.ids), dict.fromkeys(run.ids, 0)
        decided = dict.fromkeys(run.ids, 0)  # planes of its way decided, per object
        counted = 0
        frames = cast(Generator, video.propagate(start=run.start, max_frames=span, reverse=direction < 0))
        with contextlib.closing(frames):  # stopping early (or a cancel) ends the session's loop too
            for frame, obj_ids, logits in frames:
                step = (frame - run.start) * direction
                if step <= 0:
                    continue  # the start: a prompted plane, or one written in the window before
                if step > span:
                    break
                found = (torch.as_tensor(logits) > settings.threshold).cpu().numpy()
                masks, ended = {}, []
                gone: dict[int, tuple[tuple[int, ...], ...]] = {}
                for oid, present in zip(cast(list[int], obj_ids), found):
                    if oid not in live:
                        continue
                    decided[oid] = step
                    mask = PlaneMask.from_full(present, _NO_IOU, (window.region[0], window.region[2]))
                    if mask.area < settings.min_area:
                        misses[oid] += 1
                        gone[oid] = (planes[frame],)
                        if misses[oid] >= settings.stop_after:
                            live.discard(oid)
                            ended.append(oid)
                            decided[oid] = span  # the rest of its way too: it has ended
                            gone[oid] = tuple(planes[f] for f in range(frame, last + direction, direction))
                        continue
                    misses[oid] = 0
                    masks[oid] = mask
                    new = grid.around(mask.region) if grid.near_edge(window, mask.region) and step < span else window
                    if new.index != window.index:  # follow it: a new memory bank on the window around it
                        live.discard(oid)
                        moved.append(_Run(new, [oid], {oid: {frame: mask}}, frame, [(direction, last)]))
                progress[0] += sum(decided.values()) - counted
                counted = sum(decided.values())
                yield MemoryStep(planes[frame], masks, tuple(ended), gone, window.region, progress[0], progress[1])
                if not live:
                    break
        # a session that stops short (the image's end) leaves nothing more to decide for its objects
        progress[0] += sum(span - decided[oid] for oid in live)
    return moved
