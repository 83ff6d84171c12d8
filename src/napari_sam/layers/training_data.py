"""Training pairs from napari layers: the planes of an image layer annotated in a Labels
layer, as the training widget fine-tunes on them (it makes the dataset: this package stays
below training)."""

from __future__ import annotations

import numpy as np

from .prompt_layers import full_resolution, source_from_layer

__all__ = ["annotated_planes"]


def annotated_planes(image_layer, labels_layer) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """The annotated planes of an image layer and a Labels layer of the same shape.

    Parameters
    ----------
    image_layer
        A napari Image layer (its full-resolution level if multiscale), planes (T)(Z)
        then (Y, X), colour last for RGB.
    labels_layer
        A napari Labels layer of the image's planes and pixels: integer instance ids,
        0 = background.

    Returns
    -------
    images, labels, names
        Per plane with objects (planes without are skipped): the (H, W) or (H, W, C)
        image plane, its (H, W) labels, and a name from the layer and the plane index
        (what :meth:`~napari_sam.train.SegmentationDataset.from_arrays` takes).

    Raises
    ------
    ValueError
        Labels of another shape than the image's planes, or no object at all.
    """
    source = source_from_layer(image_layer)
    labels = full_resolution(labels_layer)
    if tuple(labels.shape) != source.plane_grid + source.plane_shape:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match the image's planes "
                         f"{source.plane_grid + source.plane_shape}")
    images, masks, names = [], [], []
    for flat in range(source.n_planes):
        index = source.plane_index(flat)
        plane_labels = np.asarray(labels[index])
        if plane_labels.any():
            images.append(source.read(flat))
            masks.append(plane_labels)
            names.append(f"{image_layer.name}{list(index)}")
    if not images:
        raise ValueError(f"the labels layer {labels_layer.name!r} holds no objects to learn from")
    return images, masks, names
