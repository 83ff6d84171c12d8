"""Writing object masks into label images without destroying existing work."""

from __future__ import annotations

import numpy as np

__all__ = ["next_free_id", "paint"]


def next_free_id(labels) -> int:
    """One more than the largest id in ``labels`` (1 for an empty image)."""
    return int(np.max(labels)) + 1 if np.size(labels) else 1


def paint(labels: np.ndarray, mask: np.ndarray, label_id: int, overwrite: bool = False) -> int:
    """Write ``label_id`` where ``mask`` is true, in place.

    Parameters
    ----------
    labels
        Integer label image, modified in place.
    mask
        Boolean mask of the same shape.
    label_id
        Id to write; must fit the dtype of ``labels``.
    overwrite
        Also replace pixels that already belong to another object. By default only
        background (0) pixels are written, so earlier objects are never damaged.

    Returns
    -------
    int
        Number of pixels written.
    """
    if mask.shape != labels.shape:
        raise ValueError(f"mask shape {mask.shape} does not match labels shape {labels.shape}")
    if label_id <= 0:
        raise ValueError(f"label ids start at 1, got {label_id}")
    if np.issubdtype(labels.dtype, np.integer) and label_id > np.iinfo(labels.dtype).max:
        raise ValueError(f"id {label_id} does not fit labels of dtype {labels.dtype}")
    target = mask if overwrite else mask & (labels == 0)
    labels[target] = label_id
    return int(target.sum())
