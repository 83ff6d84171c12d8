"""Instance segmentations written into a label image as new objects, in one undo step.

Automatic segmentation (:mod:`napari_sam.auto`) returns each plane's objects numbered
1..n, the same number on every plane for an object linked through a stack. Committed, they
take ids after the label image's largest, keep those ids across planes, and leave
the objects already there alone unless asked.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .labels import LabelWriter
from .masks import PlaneMask

__all__ = ["commit_instances"]


def commit_instances(writer: LabelWriter, planes: Sequence[tuple[int, ...]], found: np.ndarray,
                     overwrite: bool = False) -> np.ndarray:
    """Write (Z, H, W) objects ``found`` (ids 1..n, one per 3D object; Z = ``len(planes)``)
    under new ids, as one undo step of ``writer``.

    Parameters
    ----------
    writer
        Where they go; no undo step may be open.
    planes
        The label array's leading index of each plane of ``found``.
    found
        (Z, H, W) integer labels (row, col), 0 = background.
    overwrite
        Paint over objects already in the label image (else they keep their pixels).

    Returns
    -------
    numpy.ndarray
        (Z, H, W) uint32: the objects under their new ids where they were written, 0 elsewhere.
    """
    writer.check_no_step_open()
    base = writer.next_id() - 1
    out = np.zeros(found.shape, np.uint32)
    with writer.one_step():
        for k, plane in enumerate(planes):
            masks, ids = [], []
            for i, box in enumerate(ndimage.find_objects(found[k]), start=1):
                if box is not None:
                    masks.append(PlaneMask((box[0].start, box[0].stop, box[1].start, box[1].stop),
                                           found[k][box] == i, 1.0, ()))
                    ids.append(base + i)
            if masks:
                writer.commit(plane, masks, overwrite=overwrite, ids=ids)
                now = np.asarray(writer.labels[plane])
                mine = (found[k] > 0) & (now == found[k].astype(np.int64) + base)
                out[k][mine] = now[mine]
    return out
