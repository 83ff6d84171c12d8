"""What an instance decoder learns to predict from a label image.

micro-sam trains its instance decoders on torch-em's per-object distance targets
(``PerObjectDistanceTransform`` with foreground, centre and boundary distances): for each
pixel, whether it belongs to an object, and its distance to that object's centre and to
its boundary, each divided by the object's largest such distance so that every object
spans [0, 1] whatever its size. Outside objects both distances are 1. AIS
(:func:`napari_sam.auto.ais.instances_from_maps`) reads them back: seeds where both
distances are small, flooding over the boundary distance.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

__all__ = ["instance_targets"]

_EPS = 1e-7


def instance_targets(labels: np.ndarray) -> np.ndarray:
    """Foreground, centre distance and boundary distance maps of a label image.

    Per object: the Euclidean distance of each pixel to the object's rounded centroid (to
    its deepest pixel when the centroid falls outside a non-convex object) and the
    object's greatest depth minus each pixel's depth (depth: distance to the object's
    inner boundary pixels), each divided by its maximum over the object.

    Parameters
    ----------
    labels
        (H, W) integer instance labels, 0 = background.

    Returns
    -------
    numpy.ndarray
        (3, H, W) float32 in [0, 1]: foreground (0/1), centre distances, boundary
        distances; both distances are 1 outside objects.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iub":
        raise ValueError(f"instance targets need a 2D integer label image, not {labels.dtype} of shape {labels.shape}")
    labels = labels.astype(np.int64, copy=False)
    out = np.ones((3, *labels.shape), np.float32)
    out[0] = labels > 0
    if not out[0].any():
        return out
    boundaries = find_boundaries(labels, mode="inner")
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        mask = labels[box] == index
        depth = ndi.distance_transform_edt(~boundaries[box])
        depth[~mask] = 0
        deepest = np.unravel_index(np.argmax(depth), depth.shape)
        # Rounded in image coordinates, as torch-em does: numpy rounds halves to even,
        # so rounding in box coordinates would move some centres by a pixel.
        start = np.array([sl.start for sl in box])
        centre = (np.round(np.asarray(ndi.center_of_mass(mask)) + start) - start).astype(int)
        if not mask[tuple(centre)]:
            centre = np.asarray(deepest)
        rows, cols = np.indices(mask.shape)
        to_centre = np.hypot(rows - centre[0], cols - centre[1])
        to_boundary = depth[deepest] - depth
        for channel, values in ((1, to_centre), (2, to_boundary)):
            values = values[mask]
            out[channel][box][mask] = values / (np.abs(values).max() + _EPS)
    return out
