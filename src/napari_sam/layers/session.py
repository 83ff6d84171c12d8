"""A viewer session: an :class:`~napari_sam.api.Annotator` driven from napari's layers.

A :class:`ViewerSession` connects an Annotator to a viewer (made by
:func:`~napari_sam.layers.attachment.attach`):

* a Points layer ("SAM points") whose points carry a ``positive`` feature (True:
  foreground, drawn green; False: background, drawn red);
* a Shapes layer ("SAM boxes") whose rectangles are boxes;
* a Labels layer ("SAM preview") showing the objects the current prompts describe, and
  the Labels layer objects are committed into ("SAM labels"; a Zarr array on disk for
  large images).

Every prompt applies to the plane it was placed on (the layers' side is
:mod:`napari_sam.layers.prompt_layers`).

Nothing here blocks for long by itself: :attr:`ViewerSession.run` executes the slow
steps (embedding, previews, commits) and the dock widget hands in a runner that uses
napari's thread workers. From the console the steps simply run in turn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..api import Annotator
from ..core.labels import Commit
from ..core.masks import PlaneMask
from ..core.memory_labels import PROMPTED_ATTR
from ..core.prompts import Prompt
from .bound_layers import BoundLayers, painted_ids
from .keys import KEYS, bind_keys, step_planes
from .prompt_layers import (
    draw_preview,
    prompted_planes,
    prompts_on,
    remove_prompts_on,
    toggle_foreground,
)
from .tracker import SessionTracker

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["ViewerSession"]


class ViewerSession:
    """An Annotator attached to a viewer's layers (see the module docstring).

    Use :meth:`attach` (or :func:`napari_sam.layers.attach`) to make one.

    Attributes
    ----------
    run : callable
        ``run(fn, done=None, label="")`` executes ``fn()`` and passes its result to
        ``done``; synchronous by default, threaded in the dock widget.
    say : callable
        ``say(text)`` shows the outcome of a step (a commit) to the user; the dock widget
        passes its status line; printed by default (the napari console, a notebook).
    """

    def __init__(self, viewer: napari.Viewer, image_layer, annotator: Annotator, points, boxes, labels_layer, preview,
                 run: Callable | None = None, overwrite: bool = False, say: Callable[[str], None] | None = None):
        self.viewer = viewer
        self.image_layer = image_layer
        self.annotator = annotator
        self.points_layer = points
        self.boxes_layer = boxes
        self.labels_layer = labels_layer
        self.preview_layer = preview
        self.overwrite = overwrite
        self.preview_masks: list[PlaneMask] = []
        self._preview_key = None
        self._shown: tuple | None = None  # (plane, prompts, masks) of the preview on show
        self.run: Callable = run or _run_now
        self.say: Callable[[str], None] = say or print
        self.bound = BoundLayers(viewer, image_layer, labels_layer)
        # which model propagates (SAM, or a SAM 2 with memory), and the prompted planes kept with the layer
        self.tracker = SessionTracker(annotator, labels_layer.metadata.setdefault(PROMPTED_ATTR, {}))
        self.writing = ""  # the step writing the labels now: no commit or undo may interleave with it
        # a brush stroke writes an id past the writer's count: later objects must not take it
        labels_layer.events.paint.connect(
            lambda event: annotator.writer.note_id(painted_ids(event, labels_layer.selected_label)))

    # -- coordinates -----------------------------------------------------------------------
    def current_plane(self) -> tuple[int, ...]:
        """The plane the viewer shows, as an index of the image's plane axes."""
        point = self.image_layer.world_to_data(self.viewer.dims.point)
        grid = self.annotator.source.plane_grid
        return tuple(int(np.clip(np.round(p), 0, g - 1)) for p, g in zip(point[: len(grid)], grid))

    def prompts(self, plane: tuple[int, ...] | None = None) -> list[Prompt]:
        """The objects that the prompts on a plane (default: the current one) describe
        (:func:`~napari_sam.layers.prompt_layers.prompts_on`: several boxes are several
        objects; one box and the points, or points alone, are one object).

        Raises
        ------
        ValueError
            For points that describe no object (background points alone).
        """
        self._check_layers()
        plane = self.current_plane() if plane is None else tuple(plane)
        return prompts_on(self.image_layer, self.points_layer, self.boxes_layer, plane)

    @staticmethod
    def _key(plane, prompts: list[Prompt]) -> tuple:
        return (plane, *((p.points.tobytes(), p.labels.tobytes(), None if p.box is None else p.box.tobytes())
                         for p in prompts))

    # -- the steps -------------------------------------------------------------------------
    def compute_preview(self, plane: tuple[int, ...] | None = None, prompts: list[Prompt] | None = None) -> tuple:
        """Segment what the prompts on a plane describe (slow: run it through :attr:`run`).

        Parameters
        ----------
        plane
            Default: the current plane.
        prompts
            :meth:`prompts` of that plane. A worker thread must be handed them: napari
            updates a layer's data and features in separate steps, so reading the layers
            while the user clicks can see a point without its foreground flag.

        Returns
        -------
        tuple
            (plane, prompt key, masks, prompts), for :meth:`show_preview`.
        """
        self._check_layers()
        plane = self.current_plane() if plane is None else tuple(plane)
        prompts = self.prompts(plane) if prompts is None else prompts
        previous = self._refinable(plane, prompts)
        if previous is not None:
            prompts = [dataclasses.replace(prompts[0], previous=previous)]
        masks = [self.annotator.segment(plane, p) for p in prompts]
        return plane, self._key(plane, prompts), masks, prompts

    def _refinable(self, plane, prompts: list[Prompt]) -> PlaneMask | None:
        """The shown preview, when these prompts only add points to the one it answered:
        then, as in SAM's interactive loop, its logits guide the new answer. After a
        point is moved or deleted, or a box changed, the answer starts afresh."""
        shown = self._shown
        if shown is None or shown[0] != plane or len(shown[2]) != 1 or len(shown[1]) != 1 or len(prompts) != 1:
            return None
        old, new = shown[1][0], prompts[0]
        n = len(old.points)  # 0 when the shown answer came from a box alone
        same_box = (old.box is None) == (new.box is None) and (old.box is None or np.array_equal(old.box, new.box))
        if not n < len(new.points) or not same_box:
            return None
        same = np.array_equal(old.points, new.points[:n]) and np.array_equal(old.labels, new.labels[:n])
        return shown[2][0] if same else None

    def show_preview(self, result) -> None:
        """Display a :meth:`compute_preview` result (on the GUI thread)."""
        plane, key, masks = result[:3]
        self.preview_masks, self._preview_key = masks, key
        self._shown = (plane, result[3], masks) if len(result) > 3 else None
        draw_preview(self.preview_layer, self.image_layer, plane, masks)

    def preview_is_current(self, plane: tuple[int, ...] | None = None) -> bool:
        """Whether the shown preview answers the prompts as they are now."""
        plane = self.current_plane() if plane is None else tuple(plane)
        return self._preview_key is not None and self._preview_key == self._key(plane, self.prompts(plane))

    def set_overwrite(self, overwrite: bool) -> None:
        """Whether commits and propagations may replace other objects' pixels."""
        self.overwrite = bool(overwrite)

    def commit_masks(self, plane: tuple[int, ...], masks: list[PlaneMask]) -> Commit | None:
        """Write objects into the labels (runs through :attr:`run` for large objects)."""
        masks = [m for m in masks if m.area]
        if not masks:
            return None
        commit = self.annotator.commit(plane, masks, overwrite=self.overwrite)
        self.tracker.remember(commit)
        return commit

    def after_commit(self, commit: Commit | None) -> None:
        """Refresh the labels layer and clear the prompts of the committed plane."""
        if commit is None:
            return
        self.labels_layer.refresh()
        self.clear_prompts(commit.plane)

    def busy_writing(self) -> bool:
        """Whether no step may write the labels now (said to the user): while a step writes
        them, commits and undos wait, or they would interleave with it in the labels and the
        undo history; once a layer was removed or given other data, nothing is written."""
        if self.writing:
            self.say(f"{self.writing} is writing the labels: wait for it, or cancel it")
            return True
        problem = self.bound.changed()
        if problem:
            self.say(problem)
        return bool(problem)

    def _check_layers(self) -> None:
        problem = self.bound.changed()
        if problem:
            raise ValueError(problem)

    def commit(self, done: Callable | None = None, plane: tuple[int, ...] | None = None):
        """Commit what the prompts on a plane describe: the shown preview when it is current,
        else computed first. Each box is its own object. ``plane`` defaults to the current
        one, or, when it has no prompts, the one plane that has (points added from the
        console land wherever their coordinates say, whatever the viewer shows).

        Returns what :attr:`run` returns: run synchronously (the console), the
        :class:`~napari_sam.core.labels.Commit`, or None when nothing was committed."""
        if self.busy_writing():  # a second press before the first commit cleared the prompts, say
            return None
        if plane is None:
            plane = self.current_plane()
            elsewhere = prompted_planes(self.image_layer, self.points_layer, self.boxes_layer) - {plane}
            if len(elsewhere) == 1 and not self._has_prompts(plane):
                plane = elsewhere.pop()
        plane = tuple(plane)
        try:  # the prompts are read here, on the GUI thread
            current = self.preview_is_current(plane)
            prompts = None if current else self.prompts(plane)
        except ValueError as err:  # background points alone
            self.say(str(err))
            return
        masks = list(self.preview_masks) if current else None
        self.writing = "a commit"

        def work():
            try:
                objs = masks if masks is not None else self.compute_preview(plane, prompts)[2]
                return self.commit_masks(plane, objs)
            except BaseException:
                self.writing = ""
                raise

        def finished(commit):
            self.writing = ""
            self.after_commit(commit)
            shown = self.current_plane() == plane or self.image_layer.ndim == 2
            self.say(_commit_text(commit) + ("" if shown or commit is None else f" on plane {plane}"))
            if done is not None:
                done(commit)

        return self.run(work, finished, "committing")

    def _has_prompts(self, plane: tuple[int, ...]) -> bool:
        try:
            return bool(self.prompts(plane))
        except ValueError:  # background points alone: prompts all the same
            return True

    def propagation(self, label_id: int | None = None, axis: str | None = None, **settings):
        """A generator propagating object ``label_id`` (default: the labels layer's selected
        label) from the current plane through its neighbours, with the model :attr:`tracker`
        holds (:meth:`~napari_sam.layers.tracker.SessionTracker.selected`). Labels are written
        as it runs: call :meth:`labels_layer.refresh` to show them."""
        from ..core.propagation import PropagationSettings

        self._check_layers()
        label_id = int(self.labels_layer.selected_label if label_id is None else label_id)
        return self.tracker.selected(self.current_plane(), label_id, axis, PropagationSettings(**settings),
                                     self.overwrite)

    def propagation_all(self, axis: str | None = None, ids=None, **settings):
        """A generator propagating every object of the labels (or those in ``ids``) as one
        undo step (:meth:`~napari_sam.layers.tracker.SessionTracker.all`)."""
        from ..core.propagation import PropagationSettings

        self._check_layers()
        return self.tracker.all(axis, PropagationSettings(**settings), self.overwrite, ids)

    def segment_everything(self, plane: tuple[int, ...] | None = None, mode: str | None = None,
                           points_per_side: int = 16, rough=None, *, whole_volume: bool = False, **settings):
        """A generator segmenting and committing every object of a plane (default: the current
        one), or of the stack through it, as :meth:`napari_sam.api.Annotator.segment_everything`
        with this session's :attr:`overwrite`. ``mode``: one of :func:`~napari_sam.layers.
        everything.mode_choices`', ``"labels"`` (the boxes of the objects of ``rough``, a Labels
        layer or array) or None (the model's advice). Yields Progress; returns the labels
        written. Call :meth:`labels_layer.refresh` afterwards."""
        from ..auto import recommended
        from .everything import rough_labels

        self._check_layers()
        plane = self.current_plane() if plane is None else tuple(plane)
        mode = recommended(self.annotator.model).mode if mode is None else mode
        if mode == "auto":
            settings = {"points_per_side": points_per_side, **settings}
        if mode == "labels":
            rough = rough_labels(rough, self.annotator.labels_shape)
        return self.annotator.segment_everything_steps(plane, mode, whole_volume=whole_volume,
                                                       overwrite=self.overwrite, rough=rough, **settings)

    def undo(self) -> list[Commit]:
        """Undo the last commit (or propagation); nothing while a step writes the labels."""
        if self.busy_writing():
            return []
        undone = self.annotator.undo()
        if undone:
            self.labels_layer.refresh()
        return undone

    def clear_prompts(self, plane: tuple[int, ...] | None = None) -> None:
        """Remove the points and boxes of a plane (default: the current one) and the preview."""
        plane = self.current_plane() if plane is None else tuple(plane)
        remove_prompts_on(self.image_layer, self.points_layer, self.boxes_layer, plane)
        self.show_preview((plane, None, []))

    def toggle_mode(self) -> bool:
        """Switch new points between foreground and background; returns True for foreground."""
        return toggle_foreground(self.points_layer)

    def step(self, delta: int) -> None:
        """Go ``delta`` planes along the innermost plane axis (Z, else T)."""
        step_planes(self.viewer, self.image_layer, delta)

    def bind_keys(self) -> None:
        """Bind :data:`~napari_sam.layers.keys.KEYS` on the viewer to this session."""
        bind_keys(self.viewer, self)


def _commit_text(commit: Commit | None) -> str:
    """What a commit did, in one status line (the label ids it wrote, what it could not)."""
    if commit is None:
        return "nothing to commit: add points or boxes"
    ids, blocked = [i for i in commit.ids if i], sum(1 for i in commit.ids if not i)
    text = f"committed object(s) {ids}" if ids else "nothing committed"
    if blocked:
        text += f"; {blocked} object(s) found no free pixel (tick 'overwrite existing labels' to replace)"
    return text + (f" ({KEYS['undo']} undoes)" if ids else "")


def _run_now(fn, done=None, label: str = ""):
    result = fn()
    if done is not None:
        done(result)
    return result
