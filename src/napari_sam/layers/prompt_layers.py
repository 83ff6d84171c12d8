"""The napari side of prompts: the layers a session adds, their coordinates, and the
:class:`~napari_sam.core.prompts.Prompt` values they describe.

Coordinates go from a prompt layer's data to the world (its scale, translate, ...) and
from the world to the image layer's data, so prompt layers may have transforms of their
own. napari orders coordinates (plane..., row, col); the core takes (x, y) = (col, row):
converted here, nowhere else.
"""

from __future__ import annotations

import os

import numpy as np

from ..core.image_source import ImageSource
from ..core.prompts import Prompt

__all__ = [
    "BACKGROUND",
    "BOXES",
    "FOREGROUND",
    "LABELS",
    "POINTS",
    "PREVIEW",
    "add_session_layers",
    "draw_preview",
    "image_layer_of",
    "plane_of",
    "prompted_planes",
    "prompts_on",
    "remove_prompts_on",
    "source_from_layer",
    "to_image",
    "toggle_foreground",
]

POINTS = "SAM points"
BOXES = "SAM boxes"
PREVIEW = "SAM preview"
LABELS = "SAM labels"
FOREGROUND, BACKGROUND = "lime", "red"


def full_resolution(layer):
    """A layer's data, or its full-resolution level (level 0) when it is a pyramid."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def source_from_layer(layer) -> ImageSource:
    """The ImageSource of an image layer: its full-resolution data (level 0 of a pyramid),
    with axes (T)(Z)YX(C).

    The axes come from the layer's axis labels when they are axis letters (napari-ome-zarr
    gives the OME-Zarr's own), else from its dimensionality; RGB layers keep their colours.
    A layer read from a Zarr store (an OME-Zarr opened with napari-ome-zarr, say) is read
    through that store, so the embedding cache is the one beside it that ``napari-sam
    embed`` fills, and is shared with the command line.
    """
    data = full_resolution(layer)
    spatial = layer.ndim
    if spatial < 2 or spatial > 4:
        raise ValueError(f"layer {layer.name!r} has {spatial} dimensions: SAM segments 2D planes of 2D to 4D images")
    axes = _layer_axes(layer) or "TZ"[2 - (spatial - 2) :] + "YX"
    axes += "C" if layer.rgb else ""
    stored, path = _stored_array(layer, data)
    return ImageSource(data if stored is None else stored, axes, path=path)


def _layer_axes(layer) -> str | None:
    """The layer's axis labels as our letters, when they name the axes (t, z, y, x);
    a layer holding several channels (a ``c`` axis) is refused."""
    labels = [str(a).upper() for a in getattr(layer, "axis_labels", ())]
    axes = "".join(labels)
    data = full_resolution(layer)
    if "C" in labels and not layer.rgb and data.shape[labels.index("C")] > 1:  # else segmented as planes
        raise ValueError(f"layer {layer.name!r} holds channels (axes {axes}): open them as one layer each "
                         "(viewer.add_image(data, channel_axis=...)) and segment the nuclei's layer")
    if len(labels) == layer.ndim and all(len(a) == 1 for a in labels) and axes.endswith("YX") \
            and set(axes) <= set("TZYX") and len(set(axes)) == len(axes):
        return axes
    return None


def _stored_array(layer, data) -> tuple:
    """(zarr array, path) of the store the layer was read from when it holds exactly the
    layer's full-resolution data, else (None, None)."""
    from ..core.io import read_image

    path = getattr(getattr(layer, "source", None), "path", None)
    if not path or not os.path.isdir(path):  # only a Zarr folder is opened lazily; a file would be read whole
        return None, None
    try:
        stored = read_image(path)
    except (ValueError, OSError):  # a file format we do not read, or not there any more
        return None, None
    if not hasattr(stored, "store_path") or tuple(stored.shape) != tuple(data.shape) \
            or np.dtype(stored.dtype) != np.dtype(data.dtype):
        return None, None  # a TIFF held in memory, or one channel of a multichannel store
    return stored, path


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


def _find(viewer, name: str):
    return viewer.layers[name] if name in viewer.layers else None


def _fit(viewer, layer, ndim: int, geometry: dict) -> None:
    """Give an earlier session's layer this image's geometry; one of other axes is removed
    (its prompts were placed on another image)."""
    if layer is None:
        return
    if layer.ndim != ndim:
        viewer.layers.remove(layer)
        return
    for key, value in geometry.items():
        setattr(layer, key, value)


def add_session_layers(viewer, image_layer, point_size: float) -> tuple:
    """The points, boxes and preview layers of a session, added over ``image_layer`` with
    its geometry, or found when an earlier session left them.

    Returns
    -------
    tuple
        (points, boxes, preview) layers.
    """
    geometry = {"scale": image_layer.scale, "translate": image_layer.translate, "units": image_layer.units}
    for name in (POINTS, BOXES, PREVIEW):  # an earlier session's, fitted to this image or removed
        _fit(viewer, _find(viewer, name), image_layer.ndim, geometry)
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
        size=point_size,
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
    return points, boxes, preview


def to_image(image_layer, layer, coords: np.ndarray) -> np.ndarray:
    """(N, ndim) data coordinates of ``layer`` -> data coordinates of the image layer."""
    if len(coords) == 0:
        return np.zeros((0, image_layer.ndim))
    world = [layer.data_to_world(c) for c in np.asarray(coords, dtype=np.float64)]
    return np.array([image_layer.world_to_data(w) for w in world], dtype=np.float64)


def plane_of(image_layer, coords: np.ndarray) -> tuple[int, ...]:
    """The plane (index over the image's plane axes) of image data coordinates."""
    n = image_layer.ndim - 2
    return tuple(int(np.round(c)) for c in coords[:n])


def prompts_on(image_layer, points_layer, boxes_layer, plane: tuple[int, ...]) -> list[Prompt]:
    """The objects that the prompt layers describe on one plane.

    The rule of the prompt layers: several boxes are several objects (points then refine
    none of them); one box and the points are one object; points alone are one object;
    nothing is no object. A point's ``positive`` feature says foreground (True) or
    background; a point beside the image prompts nothing; boxes are the Shapes layer's
    rectangles.

    Returns
    -------
    list of Prompt
        In the core's frame: (x, y) plane pixels.

    Raises
    ------
    ValueError
        For points that describe no object (background points alone).
    """
    n = image_layer.ndim - 2
    pts = to_image(image_layer, points_layer, points_layer.data)
    positive = np.asarray(points_layer.features.get("positive", np.ones(len(pts), bool)), bool)
    on_plane = np.array([plane_of(image_layer, p) == plane for p in pts], bool) if len(pts) else np.zeros(0, bool)
    # a click beside the image (a stray one, or at the edge of the canvas) prompts nothing
    # there, and must not block the slice's other prompts
    H, W = image_layer.level_shapes[0][n : n + 2]
    if len(pts):
        on_plane &= (pts[:, n] >= 0) & (pts[:, n] < H) & (pts[:, n + 1] >= 0) & (pts[:, n + 1] < W)
    points = pts[on_plane][:, [n + 1, n]]  # napari's (row, col) -> SAM's (x, y)
    labels = positive[on_plane].astype(np.int64)
    boxes = []
    for shape, kind in zip(boxes_layer.data, boxes_layer.shape_type):
        if kind != "rectangle":
            continue
        corners = to_image(image_layer, boxes_layer, shape)
        if plane_of(image_layer, corners.mean(0)) != plane:
            continue
        ys, xs = corners[:, n], corners[:, n + 1]
        boxes.append(np.array([xs.min(), ys.min(), xs.max(), ys.max()]))
    if len(boxes) > 1:
        return [Prompt.make(box=b) for b in boxes]
    if not boxes and not len(points):
        return []
    return [Prompt.make(points if len(points) else None, labels if len(points) else None, boxes[0] if boxes else None)]


def prompted_planes(image_layer, points_layer, boxes_layer) -> set[tuple[int, ...]]:
    """The planes of the image on which any point or box lies (prompts beyond its first or
    last plane prompt nothing, as prompts beside it do)."""
    planes = {plane_of(image_layer, p) for p in to_image(image_layer, points_layer, points_layer.data)}
    for shape in boxes_layer.data:
        planes.add(plane_of(image_layer, to_image(image_layer, boxes_layer, shape).mean(0)))
    grid = tuple(image_layer.level_shapes[0][: image_layer.ndim - 2])
    return {p for p in planes if all(0 <= i < n for i, n in zip(p, grid))}


def draw_preview(preview_layer, image_layer, plane: tuple[int, ...], masks) -> None:
    """Show the objects ``masks`` (PlaneMask) of one plane in the preview layer: only their
    bounding region is stored, moved into place by the layer's translate, so that a preview
    on a large plane costs what the objects cover."""
    masks = [m for m in masks if m.area]
    ndim = image_layer.ndim
    if not masks:
        preview_layer.data = np.zeros((1,) * ndim, np.uint8)
        preview_layer.translate = image_layer.translate
        return
    y0, x0 = min(m.region[0] for m in masks), min(m.region[2] for m in masks)
    y1, x1 = max(m.region[1] for m in masks), max(m.region[3] for m in masks)
    crop = np.zeros((y1 - y0, x1 - x0), np.uint8)
    for k, m in enumerate(masks, start=1):
        my0, my1, mx0, mx1 = m.region
        crop[my0 - y0 : my1 - y0, mx0 - x0 : mx1 - x0][m.mask] = min(k, 255)
    offset = np.array([*plane, y0, x0], dtype=np.float64)
    preview_layer.data = crop.reshape((1,) * (ndim - 2) + crop.shape)
    preview_layer.translate = np.asarray(image_layer.translate) + offset * np.asarray(image_layer.scale)


def remove_prompts_on(image_layer, points_layer, boxes_layer, plane: tuple[int, ...]) -> None:
    """Delete the points and boxes placed on one plane."""
    pts = to_image(image_layer, points_layer, points_layer.data)
    keep = [i for i, p in enumerate(pts) if plane_of(image_layer, p) != plane]
    if len(keep) != len(pts):
        points_layer.selected_data = set(range(len(pts))) - set(keep)
        points_layer.remove_selected()
    drop = [
        i for i, s in enumerate(boxes_layer.data)
        if plane_of(image_layer, to_image(image_layer, boxes_layer, s).mean(0)) == plane
    ]
    if drop:
        boxes_layer.selected_data = set(drop)
        boxes_layer.remove_selected()


def toggle_foreground(points_layer) -> bool:
    """Switch the points layer's new points between foreground and background; returns
    True for foreground."""
    positive = not bool(points_layer.feature_defaults["positive"].iloc[0])
    points_layer.feature_defaults["positive"] = positive
    # the layer controls show the colour the next point gets
    points_layer.current_face_color = FOREGROUND if positive else BACKGROUND
    return positive
