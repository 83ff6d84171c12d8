"""Instances of consecutive planes joined into 3D objects by overlap."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..core.masks import label_iou

__all__ = ["link_planes"]


def link_planes(label_planes: Iterable[np.ndarray], min_iou: float = 0.3) -> np.ndarray:
    """Link the 2D instances of consecutive planes into 3D objects.

    Objects of plane z + 1 are matched one-to-one to objects of plane z by maximum total
    IoU (Hungarian assignment, :func:`scipy.optimize.linear_sum_assignment`); a matched
    object continues the 3D object of its partner, an unmatched one (or one matched with
    an IoU below ``min_iou``) starts a new 3D object. When an object splits, the piece
    overlapping it best continues it and the other starts a new object; when two merge,
    the merged object continues the one it overlaps best and the other ends.

    Parameters
    ----------
    label_planes
        Sequence of (H, W) integer label planes (or a (Z, H, W) array), each with its own
        ids, 0 = background.
    min_iou
        Smallest IoU for two objects of consecutive planes to be one object.

    Returns
    -------
    numpy.ndarray
        (Z, H, W) uint32 labels; ids 1..n numbered in order of first appearance.
    """
    planes = [np.asarray(p) for p in label_planes]
    if not planes:
        raise ValueError("no label planes to link")
    shape = planes[0].shape
    for z, p in enumerate(planes):
        if p.ndim != 2 or p.shape != shape or p.dtype.kind not in "iub":
            raise ValueError(f"plane {z}: expected an integer (H, W) = {shape} label plane, got {p.dtype} {p.shape}")
    if not 0 <= min_iou <= 1:
        raise ValueError(f"min_iou must be in [0, 1], got {min_iou}")
    out = np.zeros((len(planes), *shape), np.uint32)
    next_id = 1
    prev: np.ndarray | None = None
    prev_map: dict[int, int] = {}
    for z, plane in enumerate(planes):
        ids = np.unique(plane[plane > 0])
        mapping: dict[int, int] = {}
        if prev is not None and len(ids):
            ids_a, ids_b, iou = label_iou(prev, plane)
            if iou.size:
                rows, cols = linear_sum_assignment(iou, maximize=True)
                for r, c in zip(rows, cols):
                    # min_iou 0 still needs some overlap to link
                    if iou[r, c] >= min_iou and iou[r, c] > 0:
                        mapping[int(ids_b[c])] = prev_map[int(ids_a[r])]
        for i in ids:  # in id order, so new ids are reproducible
            if int(i) not in mapping:
                mapping[int(i)] = next_id
                next_id += 1
        if len(ids):
            lut_keys = np.array(sorted(mapping), dtype=np.int64)
            lut_vals = np.array([mapping[k] for k in lut_keys], dtype=np.uint32)
            pos = np.searchsorted(lut_keys, plane[plane > 0])
            out[z][plane > 0] = lut_vals[pos]
        prev, prev_map = plane, mapping
    return out
