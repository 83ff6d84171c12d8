"""A viewer session made: an image layer of a viewer connected to an
:class:`~napari_sam.api.Annotator` through the prompt, preview and labels layers it adds
and the keys it binds (:class:`~napari_sam.layers.session.ViewerSession` drives it)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..api import Annotator
from .bound_layers import labels_layer_for
from .prompt_layers import LABELS, add_session_layers, image_layer_of, source_from_layer
from .session import ViewerSession

__all__ = ["attach"]


def attach(viewer, image_layer=None, model=None, labels=None, annotator: Annotator | None = None,
           run: Callable | None = None, overwrite: bool = False, say: Callable[[str], None] | None = None,
           **kwargs) -> ViewerSession:
    """Connect an :class:`~napari_sam.api.Annotator` to a napari viewer: prompt layers, a
    labels layer and keyboard shortcuts (the widget's Start, the napari console, scripts).

    Parameters
    ----------
    viewer
        A ``napari.Viewer``.
    image_layer
        The image layer to segment (default: the selected or the first image layer).
    model
        As for :class:`~napari_sam.api.Annotator`.
    labels
        An existing napari Labels layer (objects go into it), a path (a Zarr array on
        disk) or None (a new layer).
    annotator
        One built beforehand (in a worker thread, say: loading a model takes a while),
        used as it is.
    run, say, overwrite
        The runner of slow steps, what shows their outcome, and whether commits may
        replace other objects' pixels (see :class:`~napari_sam.layers.session.ViewerSession`).
    kwargs
        Further keywords of :class:`~napari_sam.api.Annotator`.

    Returns
    -------
    ViewerSession
    """
    image_layer = image_layer_of(viewer, image_layer)
    if kwargs.get("axes") is not None or isinstance(kwargs.get("channel"), (int, np.integer)):  # shown as is
        raise ValueError("a layer is segmented with its own axes: open a multichannel image as one layer per "
                         "channel (viewer.add_image(data, channel_axis=...)) and attach the nuclei's layer")
    labels_layer = labels_layer_for(viewer, image_layer, labels, LABELS if annotator is None else None)
    if annotator is None:
        annotator = Annotator(source_from_layer(image_layer), model, labels_layer.data if labels_layer else labels,
                              **kwargs)
    if labels_layer is None:
        # An NGFF label image comes with its pyramid: napari then shows the level that
        # suits the zoom, as it does for the image, instead of loading whole full-size planes.
        levels = annotator.label_levels
        labels_layer = viewer.add_labels(levels if len(levels) > 1 else levels[0], multiscale=len(levels) > 1,
                                         name=LABELS, scale=image_layer.scale, translate=image_layer.translate,
                                         units=image_layer.units)
    points, boxes, preview = add_session_layers(viewer, image_layer,
                                                max(4.0, 0.015 * max(annotator.source.plane_shape)))
    session = ViewerSession(viewer, image_layer, annotator, points, boxes, labels_layer, preview, run, overwrite, say)
    session.bind_keys()
    viewer.layers.selection.active = points
    points.mode = "add"
    return session
