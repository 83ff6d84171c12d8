"""Objects of a label image propagated with SAM 2's memory and written back.

The API, the command line and the widget share this path (:class:`Tracking`; which model
is a SAM 2 is :func:`napari_sam.core.sam2_models.split_models`'s answer): which planes of an
object are its prompted planes, where SAM's propagation starts (:func:`propagation_starts`),
and how each plane's result is written:

* **Prompted planes.** The planes an object was committed or propagated from
  (:meth:`Tracking.remember`), where it is still drawn (a correction drawn on a plane
  and propagated from there becomes one). They are kept with the labels where the labels
  can hold them (a Zarr array's attributes, ``PROMPTED_ATTR``; the widget keeps them in
  the Labels layer's metadata; a numpy array, in this process while it lives), so that a
  later session on the same labels never takes a propagated plane for a prompted one and
  rewrites the planes a person committed. Without any, the plane
  where it is largest (``seeds="largest"``, as SAM's propagation starts), or every plane
  it is drawn on (``seeds="drawn"``: a label image of annotations, as ``napari-sam
  propagate`` reads its seeds). Prompted planes are never written.
* **Writing.** Each plane is written as soon as it is known, under the object's own id:
  its earlier pixels on that plane are replaced (re-propagating an object rewrites it;
  on the planes where it is now found absent, or beyond where it now ends, its earlier
  pixels are cleared),
  other objects' pixels are kept unless ``overwrite``, and the whole propagation is one
  undo step, also when it is cancelled.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from ..model.sam2 import Sam2
from .image_source import ImageSource
from .labels import LabelWriter
from .masks import PlaneMask
from .memory_propagation import MemorySettings, MemoryStep, propagate_objects
from .preprocess import Normalization
from .propagation import PropagationSettings, PropagationStep
from .sam2_features import Sam2Features

__all__ = ["PROMPTED_ATTR", "SEEDS", "Tracking", "kept_prompted", "note_prompted", "object_planes",
           "propagation_starts"]

PROMPTED_ATTR = "napari_sam_prompted"
"""Where a Zarr label array keeps its objects' prompted planes: ``{"id": [[plane...], ...]}``."""

SEEDS = ("largest", "drawn")
"""Where objects without remembered prompted planes are propagated from (see the module notes)."""


def object_planes(labels, n_plane_axes: int, ids=None) -> dict[int, dict[tuple[int, ...], int]]:
    """Object id -> {plane: its pixels there} for every object (or those in ``ids``, one id
    or several; an id not in the labels is a ValueError) of an integer label array
    (planes..., Y, X), read plane by plane (a Zarr volume is never loaded whole)."""
    out: dict[int, dict[tuple[int, ...], int]] = {}
    wanted = None if ids is None else {int(i) for i in np.atleast_1d(ids)}  # one id or several
    for plane in np.ndindex(*labels.shape[:n_plane_axes]):
        values, counts = np.unique(np.asarray(labels[plane]), return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            if v and (wanted is None or v in wanted):
                out.setdefault(v, {})[tuple(int(i) for i in plane)] = c
    if wanted is not None and (missing := sorted(wanted - set(out))):
        raise ValueError(f"no object {missing} in the labels: nothing to propagate from")
    return dict(sorted(out.items()))


def _largest(planes: dict[tuple[int, ...], int]) -> tuple[int, ...]:
    return max(planes, key=lambda p: (planes[p], tuple(-i for i in p)))


def propagation_starts(labels, plane_axes: str, axis: str | None = None, ids=None,
                       min_area: int = 1) -> tuple[list[tuple[int, tuple[int, ...]]], list[str]]:
    """Where SAM re-prompting starts each object: the plane where it is largest, once per
    time point when a TZYX image is followed along Z (each time point's stack on its own).

    Parameters
    ----------
    labels
        (planes..., Y, X) integer labels.
    plane_axes
        The image's plane axes (``"Z"``, ``"T"``, ``"TZ"``).
    axis
        The axis followed (None: the innermost plane axis).
    ids, min_area
        The objects (None: all); a start with fewer pixels is left out.

    Returns
    -------
    starts, skipped
        (id, plane) pairs in id order; a note per start left out as too small.

    Raises
    ------
    ValueError
        When no object is left to start from (none in the labels, or all too small).
    """
    starts, skipped = [], []
    for label_id, planes in object_planes(labels, len(plane_axes), ids).items():
        for plane in _largest_per_stack(planes, plane_axes, axis):
            if planes[plane] < min_area:
                skipped.append(f"object {label_id} on plane {plane} ({planes[plane]} pixel(s))")
            else:
                starts.append((label_id, plane))
    if not starts:  # said before any work starts, as SAM 2's propagation says it
        raise ValueError("no objects to propagate: the labels hold none" + ("" if ids is None else f" of {ids}")
                         + (f" of at least min_area={min_area} pixels ({'; '.join(skipped)})" if skipped else ""))
    return starts, skipped


def _largest_per_stack(planes: dict[tuple[int, ...], int], plane_axes: str, axis: str | None) -> list[tuple[int, ...]]:
    """The plane where an object (its pixel count per plane) is largest, once per time
    point of a TZYX image followed along Z: each time point's stack is its own."""
    axis = (axis or plane_axes[-1:] or "Z").upper()
    per_time = plane_axes == "TZ" and axis == "Z"
    groups: dict[tuple[int, ...], dict[tuple[int, ...], int]] = {}
    for plane, count in planes.items():
        groups.setdefault(plane[:1] if per_time else (), {})[plane] = count
    return [_largest(group) for group in groups.values()]


_IN_MEMORY: dict[int, dict] = {}
"""What a numpy label array keeps (it has no attributes), by the array's id while it lives."""


def _keeper(labels):
    """Where ``labels`` keep their prompted planes: a Zarr array's attributes, a numpy
    array's entry in this process, or None."""
    attrs = getattr(labels, "attrs", None)
    if attrs is not None or not isinstance(labels, np.ndarray):
        return attrs
    key = id(labels)
    if key not in _IN_MEMORY:
        _IN_MEMORY[key] = {}
        weakref.finalize(labels, _IN_MEMORY.pop, key, None)  # an id is reused once the array is gone
    return _IN_MEMORY[key]


def kept_prompted(labels) -> dict[int, set[tuple[int, ...]]]:
    """The prompted planes a label array keeps (``PROMPTED_ATTR``), by object id."""
    keeper = _keeper(labels)
    stored = None if keeper is None else dict(keeper).get(PROMPTED_ATTR)
    out: dict[int, set[tuple[int, ...]]] = {}
    if isinstance(stored, dict):
        try:
            for oid, planes in stored.items():
                out.setdefault(int(oid), set()).update(tuple(int(i) for i in p) for p in planes)
        except (TypeError, ValueError):  # edited by hand into something else: not trusted
            return {}
    return out


def note_prompted(labels, prompted: Mapping[int, Iterable[tuple[int, ...]]]) -> None:
    """Keep these prompted planes (object id -> planes) with ``labels``, beside those they
    keep already: in a Zarr array's attributes, for a numpy array in this process."""
    keeper = _keeper(labels)
    if keeper is None:
        return
    kept = kept_prompted(labels)
    new = {(int(oid), tuple(int(i) for i in p)) for oid, planes in prompted.items() if oid for p in planes}
    new = {(oid, p) for oid, p in new if p not in kept.get(oid, ())}
    if not new:
        return  # nothing new: no metadata write
    for oid, plane in new:
        kept.setdefault(oid, set()).add(plane)
    keeper[PROMPTED_ATTR] = {str(oid): sorted(list(p) for p in planes) for oid, planes in sorted(kept.items())}


def _masks(labels, label_id: int, planes) -> dict[tuple[int, ...], PlaneMask]:
    """The object's masks on those of ``planes`` where it is drawn."""
    masks = {p: PlaneMask.from_full(np.asarray(labels[p]) == label_id) for p in planes}
    return {p: m for p, m in masks.items() if m.area}


@dataclass
class Tracking:
    """Propagation of a label image's objects with a SAM 2, and what it remembers.

    Parameters
    ----------
    source
        The image (:class:`~napari_sam.core.image_source.ImageSource`).
    model
        The SAM 2.
    cache, normalization
        For its :class:`~napari_sam.core.sam2_features.Sam2Features` (made on first use).
    """

    source: ImageSource
    model: Sam2
    cache: str | os.PathLike | bool | None = None
    normalization: Normalization = Normalization()

    def __post_init__(self):
        self._features: Sam2Features | None = None
        self.prompted: dict[int, set[tuple[int, ...]]] = {}

    @property
    def features(self) -> Sam2Features:
        """The image's SAM 2 features (the cache is opened on first use)."""
        if self._features is None:
            self._features = Sam2Features(self.source, self.model, self.cache, normalization=self.normalization)
        return self._features

    def remember(self, plane: tuple[int, ...], ids) -> None:
        """``plane`` is a prompted plane of the objects ``ids`` (committed or corrected there)."""
        for i in ids:
            if i:
                self.prompted.setdefault(int(i), set()).add(tuple(int(k) for k in plane))

    def keep(self, labels) -> None:
        """Store the prompted planes with ``labels`` (see the module notes)."""
        note_prompted(labels, self.prompted)

    def recall(self, labels) -> None:
        """Take the prompted planes that ``labels`` keep (an earlier session's)."""
        for oid, planes in kept_prompted(labels).items():
            self.prompted.setdefault(oid, set()).update(planes)

    def objects(self, labels, ids=None, seeds: str = "largest", axis: str | None = None,
                min_area: int = 1) -> dict[int, dict[tuple[int, ...], PlaneMask]]:
        """Object id -> {prompted plane: its mask there} read from ``labels`` (see the module
        notes). Planes chosen by ``seeds`` (the object has no remembered prompted plane) where
        it has fewer than ``min_area`` pixels are left out with a warning (a stray brush
        click is no object to follow), objects left with none too."""
        if seeds not in SEEDS:
            raise ValueError(f"seeds must be one of {SEEDS}, not {seeds!r}")
        if ids is not None and not np.atleast_1d(ids).size:
            raise ValueError("ids is empty: give the objects to propagate, or None for all of them")
        if not self.source.plane_axes:
            raise ValueError("a 2D image has no planes to propagate through")
        self.recall(labels)
        out, skipped = {}, []
        for oid, planes in object_planes(labels, len(self.source.plane_grid), ids).items():
            chosen = [p for p in sorted(self.prompted.get(oid, ())) if p in planes]
            if not chosen:
                axes = self.source.plane_axes
                seeded = sorted(planes) if seeds == "drawn" else _largest_per_stack(planes, axes, axis)
                skipped += [f"object {oid} on plane {p} ({planes[p]} pixel(s))" for p in seeded if planes[p] < min_area]
                chosen = [p for p in seeded if planes[p] >= min_area]
            if chosen:
                out[oid] = _masks(labels, oid, chosen)
        if skipped:
            warnings.warn(f"not propagated from, smaller than min_area={min_area}: {'; '.join(skipped)}", stacklevel=4)
        return out

    def steps(self, writer: LabelWriter, ids=None, axis: str | None = None, settings=None, overwrite: bool = False,
              seeds: str = "largest", objects=None, starts=None) -> Iterator[MemoryStep]:
        """Propagate objects and write each plane into ``writer`` as it comes; one undo
        step. ``objects`` (id -> {plane: mask}) and ``starts`` as for
        :func:`~napari_sam.core.memory_propagation.propagate_objects` (default: read from
        the labels)."""
        for step, _ in self._written(writer, ids, axis, settings, overwrite, seeds, objects, starts):
            yield step

    def _written(self, writer, ids, axis, settings, overwrite, seeds, objects, starts):
        """:meth:`steps`, each with the ids that got pixels on its plane."""
        min_area = _memory_settings(settings).min_area
        objects = self.objects(writer.labels, ids, seeds, axis, min_area) if objects is None else objects
        if not objects:
            raise ValueError("no objects to propagate: the labels hold none" + ("" if ids is None else f" of {ids}")
                             + ("" if min_area == 1 else f" of at least min_area={min_area} pixels"))
        for oid, planes in objects.items():  # planes propagated from stay prompted: later runs leave them be
            for plane in planes:
                self.remember(plane, [oid])
        self.keep(writer.labels)
        found = propagate_objects(self.features, objects, axis, _memory_settings(settings), starts)
        with contextlib.closing(found), writer.one_step():
            for step in found:
                written: tuple[int, ...] = ()
                if step.masks:
                    order = sorted(step.masks)
                    written = writer.commit(step.plane, [step.masks[i] for i in order], overwrite, order,
                                            replace=True).ids
                for oid, planes in step.gone.items():  # found absent: its earlier pixels there are not its
                    for plane in planes:
                        if plane not in self.prompted.get(oid, ()):
                            writer.erase(plane, [oid])
                yield step, written

    def propagate(self, writer: LabelWriter, plane: tuple[int, ...], label_id: int, axis: str | None = None,
                  settings=None, overwrite: bool = False) -> Iterator[PropagationStep]:
        """One object from ``plane`` (now one of its prompted planes: a correction when it
        had others), as :meth:`napari_sam.api.Annotator.propagate` yields it."""
        if isinstance(label_id, bool) or not isinstance(label_id, (int, np.integer)) or label_id < 1:
            raise ValueError(f"an object's id is an integer of 1 or more, not {label_id!r}")
        label_id = int(label_id)
        self.recall(writer.labels)
        masks = _masks(writer.labels, label_id, sorted(self.prompted.get(label_id, set()) | {tuple(plane)}))
        if plane not in masks:  # refused before it is remembered: a plane it is not on never becomes a prompt
            raise ValueError(f"object {label_id} is not on plane {plane}")
        self.remember(plane, [label_id])
        objects = {label_id: masks}
        nan = float("nan")  # SAM 2 scores presence, not IoU
        for step in self.steps(writer, [label_id], axis, settings, overwrite, objects=objects,
                               starts={label_id: [plane]}):
            yield PropagationStep(step.plane, step.masks.get(label_id), nan, nan, step.stopped, step.done, step.total)

    def propagate_all(self, writer: LabelWriter, ids=None, axis: str | None = None, settings=None,
                      overwrite: bool = False, progress: bool = True,
                      seeds: str = "largest") -> dict[int, list[tuple[int, ...]]]:
        """:meth:`steps` to the end with a tqdm bar (object-planes); returns, per id, the
        planes it was written on."""
        from .progress_bar import progress_bar

        objects = self.objects(writer.labels, ids, seeds, axis, _memory_settings(settings).min_area)
        out: dict[int, list[tuple[int, ...]]] = {oid: [] for oid in objects}
        with progress_bar(desc="propagating (SAM 2)", unit="object-plane", progress=progress) as bar:
            for step, written in self._written(writer, ids, axis, settings, overwrite, seeds, objects, None):
                for oid in written:
                    if oid:
                        out[oid].append(step.plane)
                bar.total, bar.n = step.total, step.done
                bar.refresh()
        return {oid: sorted(set(planes)) for oid, planes in out.items()}


def _memory_settings(settings) -> MemorySettings:
    """SAM's propagation settings (what the widget passes) carry over where they mean the same."""
    if settings is None:
        return MemorySettings()
    if isinstance(settings, PropagationSettings):
        return MemorySettings(min_area=settings.min_area, max_planes=settings.max_planes)
    if not isinstance(settings, MemorySettings):
        raise ValueError(f"SAM 2 takes MemorySettings (or PropagationSettings), not {type(settings).__name__}")
    return settings
