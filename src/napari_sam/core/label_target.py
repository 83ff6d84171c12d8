"""Where an annotator's objects go: a label array of the image's shape, a Zarr label array
on disk, an OME-Zarr label image (whose lower levels follow every change), or a new array."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .labels import MAX_ID_ATTR
from .ngff import LabelImage
from .outputs import LABELS_MARKER

__all__ = ["IN_MEMORY_LABELS", "check_label_ids", "create_label_store", "open_labels"]

IN_MEMORY_LABELS = 1 << 30
"""Label images up to this size (bytes) are kept in memory; larger ones go to a Zarr array on disk."""


def check_label_ids(labels: np.ndarray, what: str = "labels") -> None:
    """Raise ValueError unless integer ``labels`` (a numpy array) hold ids from 0
    (background) to 2**32 - 1, what napari-sam numbers objects with: a negative "ignore"
    value or an id past uint32 would otherwise wrap around into another object's id. Other
    dtypes are for the caller to refuse or accept."""
    if labels.dtype.kind not in "iu" or labels.size == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(f"{what} hold negative values (down to {low}): objects are numbered from 1, 0 is the "
                         "background; map the negative values to 0 (or to ids of their own) first")
    if high > np.iinfo(np.uint32).max:
        raise ValueError(f"{what} hold ids up to {high}, past the largest napari-sam keeps (2**32 - 1)")


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
    kind = type(labels)
    # dask and xarray take item assignment, but into a copy: the objects would never land
    if not hasattr(labels, "__setitem__") or kind.__module__.split(".")[0] in ("dask", "xarray"):
        raise ValueError(f"labels of type {kind.__module__.split('.')[0]}.{kind.__name__} cannot be written: give "
                         "a numpy array, a Zarr array or a path for a Zarr array on disk")
    if tuple(labels.shape) != shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, but the image needs {shape} (planes, then Y, X)")
    if isinstance(labels, np.ndarray):  # in memory: cheap to check (a Zarr array on disk is not read whole)
        check_label_ids(labels)
    return labels


def create_label_store(path, shape: tuple[int, ...], chunks: tuple[int, int] = (512, 512), dtype="uint32"):
    """A chunked on-disk Zarr v3 label array of zeros, one plane per chunk along the
    leading axes, for label volumes larger than memory.

    An existing array at ``path`` is opened instead when napari-sam made it and its shape
    matches (annotation goes on where it stopped); any other array (the image itself, say)
    or a different shape is an error, so nothing is lost.
    """
    import zarr

    path = os.fspath(path)
    if os.path.exists(path):
        try:
            existing = zarr.open_array(path, mode="r+")
        except Exception as err:  # noqa: BLE001 - whatever it is, it is not ours to replace
            raise ValueError(f"{path} exists and is not a Zarr label array: choose another place") from err
        if dict(existing.attrs).get("napari_sam") != LABELS_MARKER:  # the image itself, say
            raise ValueError(f"{path} is a Zarr array napari-sam did not write (an image, or labels from elsewhere): "
                             "choose another place (from Python, to write into it, pass "
                             "zarr.open_array(path, mode='r+') instead of its path)")
        if np.dtype(existing.dtype).kind not in "ui":
            raise ValueError(f"{path} holds {existing.dtype} values, not integer labels: choose another place")
        if tuple(existing.shape) != tuple(shape):
            raise ValueError(f"{path} holds labels of shape {tuple(existing.shape)}, not {tuple(shape)}: "
                             "choose another place")
        return existing
    chunk = tuple(1 for _ in shape[:-2]) + tuple(min(c, s) for c, s in zip(chunks, shape[-2:]))
    arr = zarr.create_array(path, shape=tuple(shape), chunks=chunk, dtype=dtype, fill_value=0, zarr_format=3,
                            attributes={"napari_sam": dict(LABELS_MARKER)})
    arr.attrs[MAX_ID_ATTR] = 0
    return arr
