"""The layers a viewer session was built on, and whether they still are what it reads and writes.

A :class:`~napari_sam.layers.session.ViewerSession` holds the image it embedded and the
label array its writer commits into. napari lets a user replace either from the console
(``layer.data = ...``) or delete the layer; a session that went on would answer from the
old image or commit into an array nothing displays, and say "committed" all the same. So
every step first asks :meth:`BoundLayers.changed`, and refuses with its one line.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BoundLayers", "check_same_grid", "labels_layer_for", "painted_ids"]


class BoundLayers:
    """The image and labels layers of a session, as they were when it started.

    Parameters
    ----------
    viewer
        The ``napari.Viewer`` holding them.
    image_layer, labels_layer
        The layer segmented, and the layer the objects are committed into.
    """

    def __init__(self, viewer, image_layer, labels_layer):
        self.viewer = viewer
        self.image_layer, self.labels_layer = image_layer, labels_layer
        self._image_data, self._labels_data = image_layer.data, labels_layer.data

    def changed(self) -> str | None:
        """None while both layers are in the viewer with the data they had at the start;
        else one line saying which changed and what to do."""
        again = "start the session again (the widget's Start, or napari_sam.layers.attach)"
        for layer, data, what in ((self.image_layer, self._image_data, "image"),
                                  (self.labels_layer, self._labels_data, "labels")):
            if layer not in self.viewer.layers:
                return f"the {what} layer {layer.name!r} was removed from the viewer: {again}"
            if layer.data is not data:
                return f"the {what} layer {layer.name!r} was given other data: {again} to work on it"
        return None


def check_same_grid(image_layer, labels_layer) -> None:
    """Refuse a labels layer that napari would draw elsewhere than the image: objects are
    written at the image's pixel indices, so a layer with another scale or offset would show
    them away from what was clicked.

    Raises
    ------
    ValueError
        Naming both layers' scale and translate.
    """
    n = labels_layer.ndim
    image_scale, image_shift = np.asarray(image_layer.scale)[-n:], np.asarray(image_layer.translate)[-n:]
    if not (np.allclose(labels_layer.scale, image_scale) and np.allclose(labels_layer.translate, image_shift)):
        raise ValueError(f"the Labels layer {labels_layer.name!r} is drawn at scale {tuple(labels_layer.scale)}, "
                         f"translate {tuple(labels_layer.translate)} but the image {image_layer.name!r} at "
                         f"{tuple(image_scale)}, {tuple(image_shift)}: objects would appear away from what was "
                         "clicked; give the labels layer the image's scale and translate first")


def labels_layer_for(viewer, image_layer, labels, reuse: str | None):
    """The Labels layer a session on ``image_layer`` writes into, or None for a new one.

    ``labels`` a napari Labels layer: that layer, refused when it is a pyramid (napari
    reads those but cannot write them) or drawn elsewhere (:func:`check_same_grid`).
    ``labels`` None: the viewer's Labels layer called ``reuse`` when it fits the image
    (same shape, same place, not a pyramid), so that attaching again (a notebook cell run
    twice) goes on in it instead of starting a second layer whose ids begin at 1 again.
    Anything else (a path, an array): None.

    Raises
    ------
    ValueError
        One line, for a layer that cannot take the objects.
    """
    from napari.layers import Labels

    if isinstance(labels, Labels):
        if labels.multiscale:
            raise ValueError(f"the Labels layer {labels.name!r} is a pyramid, which napari reads but cannot "
                             "write: to continue an OME-Zarr label image, open it with "
                             "napari_sam.core.ngff.open_label_image and pass that as labels")
        check_same_grid(image_layer, labels)
        return labels
    layer = viewer.layers[reuse] if labels is None and reuse is not None and reuse in viewer.layers else None
    if not isinstance(layer, Labels) or layer.multiscale or layer.data.shape != image_layer.data.shape[:layer.ndim]:
        return None
    try:
        check_same_grid(image_layer, layer)
    except ValueError:
        return None
    return layer


def painted_ids(event, fallback: int) -> int:
    """The largest label a Labels layer's ``paint`` event wrote (napari sends its undo atoms:
    masked atoms carry ``new_value``, index atoms the values written), else ``fallback``:
    the brush may paint another label than the selected one."""
    found = []
    for atom in getattr(event, "value", None) or ():
        value = getattr(atom, "new_value", None)
        if value is None and isinstance(atom, tuple) and len(atom) == 3:
            value = np.max(np.asarray(atom[2])) if np.size(atom[2]) else None
        if value is not None:
            found.append(int(value))
    return max(found, default=int(fallback))
