"""Where an annotator's objects go: a label array of the image's shape, a Zarr label array
on disk, an OME-Zarr label image (whose lower levels follow every change), or a new array."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .labels import create_label_store
from .ngff import LabelImage

__all__ = ["IN_MEMORY_LABELS", "open_labels"]

IN_MEMORY_LABELS = 1 << 30
"""Label images up to this size (bytes) are kept in memory; larger ones go to a Zarr array on disk."""


def open_labels(labels, shape: tuple[int, ...]):
    """The integer label array that objects are committed into.

    Parameters
    ----------
    labels
        An array of ``shape``, a path for a Zarr label array on disk (created, or reopened to
        continue), a :class:`~napari_sam.core.ngff.LabelImage` (its level 0), or None for a
        new uint32 array in memory (up to :data:`IN_MEMORY_LABELS`).
    shape
        The image's plane axes, then (Y, X).

    Raises
    ------
    ValueError
        For labels of another shape, or a new array too large for memory.
    """
    if labels is None:
        size = int(np.prod(shape)) * 4
        if size > IN_MEMORY_LABELS:
            raise ValueError(
                f"labels of shape {shape} take {size / 2**30:.1f} GiB: give labels= a path for a Zarr array on disk"
            )
        return np.zeros(shape, np.uint32)
    if isinstance(labels, (str, Path)):
        return create_label_store(labels, shape)
    if isinstance(labels, LabelImage):
        if tuple(labels.data.shape) != shape:
            raise ValueError(f"the label image {labels.path} has shape {tuple(labels.data.shape)} "
                             f"({labels.axes}), but the image needs {shape} (planes, then Y, X)")
        return labels.data
    if tuple(labels.shape) != shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, but the image needs {shape} (planes, then Y, X)")
    return labels
