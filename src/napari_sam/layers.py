"""napari layers <-> the core: prompt layers, coordinates, preview and labels layers.

A :class:`ViewerSession` connects an :class:`~napari_sam.api.Annotator` to a viewer:

* a Points layer ("SAM points") whose points carry a ``positive`` feature (True:
  foreground, drawn green; False: background, drawn red);
* a Shapes layer ("SAM boxes") whose rectangles are boxes;
* a Labels layer ("SAM preview") showing the objects the current prompts describe, and
  the Labels layer objects are committed into ("SAM labels"; a Zarr array on disk for
  large images).

Every prompt applies to the plane it was placed on. Coordinates go from the prompt
layer's data to the world (its scale, translate, ...) and from the world to the image
layer's data, so prompt layers may have transforms of their own. napari orders
coordinates (plane..., row, col); the core takes (x, y) = (col, row): converted here,
nowhere else.

Nothing here blocks for long by itself: :attr:`ViewerSession.run` executes the slow
steps (embedding, previews, commits) and the dock widget replaces it with a runner that
uses napari's thread workers. From the console the steps simply run in turn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .api import Annotator
from .core.image_source import ImageSource
from .core.labels import Commit
from .core.tiled_segmentation import PlaneMask

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["KEYS", "ViewerSession", "source_from_layer"]

POINTS = "SAM points"
BOXES = "SAM boxes"
PREVIEW = "SAM preview"
LABELS = "SAM labels"
FOREGROUND, BACKGROUND = "lime", "red"

KEYS = {
    "commit": "Shift-C",
    "clear": "Shift-X",
    "toggle": "Shift-T",
    "undo": "Shift-U",
    "next": "Shift-N",
    "previous": "Shift-P",
}
"""Keyboard shortcuts, bound on the viewer while a session is attached."""


def source_from_layer(layer) -> ImageSource:
    """The ImageSource of an image layer: its full-resolution data, with axes (T)(Z)YX(C)
    from the layer's dimensionality (RGB layers keep their colours)."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    spatial = layer.ndim
    if spatial < 2 or spatial > 4:
        raise ValueError(f"layer {layer.name!r} has {spatial} dimensions: SAM segments 2D planes of 2D to 4D images")
    axes = "TZ"[2 - (spatial - 2) :] + "YX" + ("C" if layer.rgb else "")
    return ImageSource(data, axes)


class ViewerSession:
    """An Annotator attached to a viewer's layers (see the module docstring).

    Use :meth:`attach` (or :func:`napari_sam.api.attach`) to make one.

    Attributes
    ----------
    run : callable
        ``run(fn, done=None, label="")`` executes ``fn()`` and passes its result to
        ``done``; synchronous by default, threaded in the dock widget.
    """

    def __init__(self, viewer: napari.Viewer, image_layer, annotator: Annotator, points, boxes, labels_layer, preview):
        self.viewer = viewer
        self.image_layer = image_layer
        self.annotator = annotator
        self.points_layer = points
        self.boxes_layer = boxes
        self.labels_layer = labels_layer
        self.preview_layer = preview
        self.overwrite = False
        self.preview_masks: list[PlaneMask] = []
        self._preview_key = None
        self._shown: tuple | None = None  # (plane, prompts, masks) of the preview on show
        self.run: Callable = _run_now
        self._bound = False

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def attach(cls, viewer, image_layer=None, model=None, labels=None, annotator: Annotator | None = None, **kwargs) -> ViewerSession:
        """Create the prompt, preview and labels layers for ``image_layer`` and bind keys.

        ``labels`` may be an existing napari Labels layer (objects go into it), a path (a
        Zarr array on disk) or None (a new layer); other keywords go to
        :class:`~napari_sam.api.Annotator`. An ``annotator`` built beforehand (in a worker
        thread, say: loading a model takes a while) is used as it is.
        """
        from napari.layers import Labels

        image_layer = cls.image_layer_of(viewer, image_layer)
        labels_layer = labels if isinstance(labels, Labels) else None
        if annotator is None:
            annotator = Annotator(source_from_layer(image_layer), model, labels_layer.data if labels_layer else labels, **kwargs)
        geometry = {"scale": image_layer.scale, "translate": image_layer.translate, "units": image_layer.units}
        if labels_layer is None:
            labels_layer = viewer.add_labels(annotator.labels, name=LABELS, **geometry)
        points = _find(viewer, POINTS)
        points = points if points is not None else viewer.add_points(
            np.zeros((0, image_layer.ndim)),
            name=POINTS,
            ndim=image_layer.ndim,
            features={"positive": np.zeros(0, bool)},
            face_color="positive",
            # categories are coloured in sorted order: False (background), then True
            face_color_cycle=[BACKGROUND, FOREGROUND],
            border_color="white",
            size=max(4.0, 0.015 * max(annotator.source.plane_shape)),
            **geometry,
        )
        points.feature_defaults["positive"] = True
        points.current_face_color = FOREGROUND
        boxes = _find(viewer, BOXES)
        boxes = boxes if boxes is not None else viewer.add_shapes(
            name=BOXES, ndim=image_layer.ndim, edge_color="yellow", face_color="transparent", edge_width=2, **geometry
        )
        preview = _find(viewer, PREVIEW)
        preview = preview if preview is not None else viewer.add_labels(
            np.zeros((1,) * image_layer.ndim, np.uint8), name=PREVIEW, opacity=0.6, **geometry
        )
        session = cls(viewer, image_layer, annotator, points, boxes, labels_layer, preview)
        session.bind_keys()
        viewer.layers.selection.active = points
        points.mode = "add"
        return session

    @staticmethod
    def image_layer_of(viewer, image_layer=None):
        """The image layer to segment: the one given (or named), else the selected or the
        first image layer."""
        from napari.layers import Image

        if image_layer is None:
            images = [layer for layer in viewer.layers if isinstance(layer, Image)]
            selected = [layer for layer in viewer.layers.selection if isinstance(layer, Image)]
            if not images:
                raise ValueError("the viewer has no image layer to segment: open an image first")
            image_layer = (selected or images)[0]
        elif isinstance(image_layer, str):
            image_layer = viewer.layers[image_layer]
        if not isinstance(image_layer, Image):
            raise ValueError(f"layer {image_layer.name!r} is not an image layer")
        return image_layer

    # -- coordinates -----------------------------------------------------------------------
    def _to_image(self, layer, coords: np.ndarray) -> np.ndarray:
        """(N, ndim) data coordinates of ``layer`` -> data coordinates of the image layer."""
        if len(coords) == 0:
            return np.zeros((0, self.image_layer.ndim))
        world = [layer.data_to_world(c) for c in np.asarray(coords, dtype=np.float64)]
        return np.array([self.image_layer.world_to_data(w) for w in world], dtype=np.float64)

    def _plane_of(self, coords: np.ndarray) -> tuple[int, ...]:
        n = self.image_layer.ndim - 2
        return tuple(int(np.round(c)) for c in coords[:n])

    def current_plane(self) -> tuple[int, ...]:
        """The plane the viewer shows, as an index of the image's plane axes."""
        point = self.image_layer.world_to_data(self.viewer.dims.point)
        grid = self.annotator.source.plane_grid
        return tuple(int(np.clip(np.round(p), 0, g - 1)) for p, g in zip(point[: len(grid)], grid))

    def prompts(self, plane: tuple[int, ...] | None = None) -> dict:
        """The prompts on a plane (default: the current one), in the core's frame.

        Returns
        -------
        dict
            ``points`` (N, 2) as (x, y) plane pixels, ``labels`` (N,) 1/0, ``boxes`` a list
            of (x0, y0, x1, y1).
        """
        plane = self.current_plane() if plane is None else tuple(plane)
        n = self.image_layer.ndim - 2
        pts = self._to_image(self.points_layer, self.points_layer.data)
        positive = np.asarray(self.points_layer.features.get("positive", np.ones(len(pts), bool)), bool)
        on_plane = np.array([self._plane_of(p) == plane for p in pts], bool) if len(pts) else np.zeros(0, bool)
        points = pts[on_plane][:, [n + 1, n]] if on_plane.any() else np.zeros((0, 2))
        labels = positive[on_plane].astype(np.int64) if on_plane.any() else np.zeros(0, np.int64)
        boxes = []
        for shape, kind in zip(self.boxes_layer.data, self.boxes_layer.shape_type):
            if kind != "rectangle":
                continue
            corners = self._to_image(self.boxes_layer, shape)
            if self._plane_of(corners.mean(0)) != plane:
                continue
            ys, xs = corners[:, n], corners[:, n + 1]
            boxes.append(np.array([xs.min(), ys.min(), xs.max(), ys.max()]))
        return {"points": points, "labels": labels, "boxes": boxes}

    def _key(self, plane, prompts) -> tuple:
        return (plane, prompts["points"].tobytes(), prompts["labels"].tobytes(), b"".join(b.tobytes() for b in prompts["boxes"]))

    # -- the steps -------------------------------------------------------------------------
    def compute_preview(self, plane: tuple[int, ...] | None = None, prompts: dict | None = None) -> tuple:
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
        plane = self.current_plane() if plane is None else tuple(plane)
        prompts = self.prompts(plane) if prompts is None else prompts
        masks = self.annotator.segment_prompts(plane, prompts["points"], prompts["labels"], prompts["boxes"],
                                               previous=self._refinable(plane, prompts))
        return plane, self._key(plane, prompts), masks, prompts

    def _refinable(self, plane, prompts) -> PlaneMask | None:
        """The shown preview, when these prompts only add points to the ones it answered:
        then, as in SAM's interactive loop, its logits guide the new answer. After a
        point is moved or deleted, or a box changed, the answer starts afresh."""
        shown = self._shown
        if shown is None or shown[0] != plane or len(shown[2]) != 1:
            return None
        old = shown[1]
        n = len(old["points"])  # 0 when the shown answer came from a box alone
        if not n < len(prompts["points"]) or len(old["boxes"]) != len(prompts["boxes"]):
            return None
        same = (np.array_equal(old["points"], prompts["points"][:n]) and np.array_equal(old["labels"], prompts["labels"][:n])
                and all(np.array_equal(a, b) for a, b in zip(old["boxes"], prompts["boxes"])))
        return shown[2][0] if same else None

    def show_preview(self, result) -> None:
        """Display a :meth:`compute_preview` result (on the GUI thread)."""
        plane, key, masks = result[:3]
        self.preview_masks, self._preview_key = masks, key
        self._shown = (plane, result[3], masks) if len(result) > 3 else None
        masks = [m for m in masks if m.area]
        ndim = self.image_layer.ndim
        if not masks:
            self.preview_layer.data = np.zeros((1,) * ndim, np.uint8)
            self.preview_layer.translate = self.image_layer.translate
            return
        y0, x0 = min(m.region[0] for m in masks), min(m.region[2] for m in masks)
        y1, x1 = max(m.region[1] for m in masks), max(m.region[3] for m in masks)
        crop = np.zeros((y1 - y0, x1 - x0), np.uint8)
        for k, m in enumerate(masks, start=1):
            my0, my1, mx0, mx1 = m.region
            crop[my0 - y0 : my1 - y0, mx0 - x0 : mx1 - x0][m.mask] = min(k, 255)
        offset = np.array([*plane, y0, x0], dtype=np.float64)
        self.preview_layer.data = crop.reshape((1,) * (ndim - 2) + crop.shape)
        self.preview_layer.translate = np.asarray(self.image_layer.translate) + offset * np.asarray(self.image_layer.scale)

    def preview_is_current(self, plane: tuple[int, ...] | None = None) -> bool:
        """Whether the shown preview answers the prompts as they are now."""
        plane = self.current_plane() if plane is None else tuple(plane)
        return self._preview_key is not None and self._preview_key == self._key(plane, self.prompts(plane))

    def commit_masks(self, plane: tuple[int, ...], masks: list[PlaneMask]) -> Commit | None:
        """Write objects into the labels (runs through :attr:`run` for large objects)."""
        masks = [m for m in masks if m.area]
        if not masks:
            return None
        return self.annotator.commit(plane, masks, overwrite=self.overwrite)

    def after_commit(self, commit: Commit | None) -> None:
        """Refresh the labels layer and clear the prompts of the committed plane."""
        if commit is None:
            return
        self.labels_layer.refresh()
        self.clear_prompts(commit.plane)

    def commit(self, done: Callable | None = None) -> None:
        """Commit what the prompts on the current plane describe: the shown preview when it
        is current, else computed first. Each box is its own object."""
        plane = self.current_plane()
        current = self.preview_is_current(plane)
        masks = list(self.preview_masks) if current else None
        prompts = None if current else self.prompts(plane)  # read here, on the GUI thread

        def work():
            objs = masks if masks is not None else self.compute_preview(plane, prompts)[2]
            return self.commit_masks(plane, objs)

        def finished(commit):
            self.after_commit(commit)
            if done is not None:
                done(commit)

        self.run(work, finished, "committing")

    def propagation(self, label_id: int | None = None, axis: str | None = None, **settings):
        """A generator propagating object ``label_id`` (default: the labels layer's selected
        label) from the current plane through its neighbours; see
        :meth:`napari_sam.api.Annotator.propagate`. Labels are written as it runs: call
        :meth:`labels_layer.refresh` to show them."""
        from .core.propagation import PropagationSettings

        label_id = int(self.labels_layer.selected_label if label_id is None else label_id)
        return self.annotator.propagate(self.current_plane(), label_id, axis, PropagationSettings(**settings), self.overwrite)

    def segment_everything(self, plane: tuple[int, ...] | None = None, mode: str | None = None, points_per_side: int = 16,
                           rough=None):
        """A generator segmenting every object of a plane (default: the current one) and
        committing them, objects already labelled kept (see :mod:`napari_sam.core.automatic`).

        ``mode`` is ``"auto"`` (a grid of point prompts), ``"boxes"`` (a classical
        detector's boxes), ``"labels"`` (the box of each object of ``rough``, a Labels
        layer or array of the image's shape: a rough segmentation to refine) or None for
        what suits the model (:func:`~napari_sam.core.automatic.recommended`, which also
        gives the grid's filters and the detector). Yields progress; returns the Commit
        (or None)."""
        from .core import automatic

        plane = self.current_plane() if plane is None else tuple(plane)
        emb = self.annotator.embeddings
        advice = automatic.recommended(self.annotator.model)
        mode = advice.mode if mode is None else mode
        if mode == "auto":
            config = dataclasses.replace(advice.grid, points_per_side=points_per_side)
            result = yield from automatic.iter_grid(emb, plane, config)
        elif mode == "labels":
            boxes = automatic.boxes_from_labels(np.asarray(self.check_rough(rough)[plane]))[0]
            result = yield from automatic.iter_from_boxes(emb, plane, boxes)
        else:
            boxes = automatic.detect_boxes(self.annotator.source.read(plane), method=advice.detector)
            result = yield from automatic.iter_from_boxes(emb, plane, boxes)
        masks = [PlaneMask.from_full(result.labels == k) for k in range(1, int(result.labels.max()) + 1)]
        masks = [m for m in masks if m.area]
        return self.commit_masks(plane, masks) if masks else None

    def check_rough(self, rough):
        """A rough segmentation for the ``"labels"`` mode of :meth:`segment_everything`,
        checked against the image.

        Parameters
        ----------
        rough
            A Labels layer (its full-resolution level if multiscale) or an array.

        Returns
        -------
        array-like
            Its data, of the image's labels shape (planes, then Y, X).

        Raises
        ------
        ValueError
            Nothing given, or a shape that does not match the image.
        """
        if rough is None:
            raise ValueError("choose the Labels layer whose objects are to be refined")
        data = getattr(rough, "data", rough)
        name = getattr(rough, "name", "the rough labels")
        if getattr(rough, "multiscale", False):
            data = data[0]
        shape = self.annotator.labels_shape
        if tuple(data.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(data.shape)}, but the image's labels need {tuple(shape)}")
        return data

    def undo(self) -> list[Commit]:
        """Undo the last commit (or propagation)."""
        undone = self.annotator.undo()
        if undone:
            self.labels_layer.refresh()
        return undone

    def clear_prompts(self, plane: tuple[int, ...] | None = None) -> None:
        """Remove the points and boxes of a plane (default: the current one) and the preview."""
        plane = self.current_plane() if plane is None else tuple(plane)
        pts = self._to_image(self.points_layer, self.points_layer.data)
        keep = [i for i, p in enumerate(pts) if self._plane_of(p) != plane]
        if len(keep) != len(pts):
            self.points_layer.selected_data = set(range(len(pts))) - set(keep)
            self.points_layer.remove_selected()
        drop = [
            i for i, s in enumerate(self.boxes_layer.data)
            if self._plane_of(self._to_image(self.boxes_layer, s).mean(0)) == plane
        ]
        if drop:
            self.boxes_layer.selected_data = set(drop)
            self.boxes_layer.remove_selected()
        self.show_preview((plane, None, []))

    def toggle_mode(self) -> bool:
        """Switch new points between foreground and background; returns True for foreground."""
        positive = not bool(self.points_layer.feature_defaults["positive"].iloc[0])
        self.points_layer.feature_defaults["positive"] = positive
        # the layer controls show the colour the next point gets
        self.points_layer.current_face_color = FOREGROUND if positive else BACKGROUND
        return positive

    def step(self, delta: int) -> None:
        """Go ``delta`` planes along the innermost plane axis (Z, else T)."""
        n = self.image_layer.ndim - 2
        if n == 0:
            return
        axis = self.viewer.dims.ndim - self.image_layer.ndim + n - 1
        current = self.viewer.dims.current_step[axis]
        self.viewer.dims.set_current_step(axis, max(0, current + delta))

    def bind_keys(self) -> None:
        """Bind :data:`KEYS` on the viewer."""
        actions = {
            "commit": lambda viewer: self.commit(),
            "clear": lambda viewer: self.clear_prompts(),
            "toggle": lambda viewer: self.toggle_mode(),
            "undo": lambda viewer: self.undo(),
            "next": lambda viewer: self.step(1),
            "previous": lambda viewer: self.step(-1),
        }
        for name, key in KEYS.items():
            self.viewer.bind_key(key, actions[name], overwrite=True)
        self._bound = True


def _run_now(fn, done=None, label: str = ""):
    result = fn()
    if done is not None:
        done(result)
    return result


def _find(viewer, name: str):
    return viewer.layers[name] if name in viewer.layers else None
