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

__all__ = ["CONTACT_SIGMA", "contact_band", "instance_targets"]

_EPS = 1e-7

CONTACT_SIGMA = 2.0
"""Width (pixels, a Gaussian's sigma) of the band :func:`contact_band` lays along contacts."""

_CONTACT_REACH = 2
"""Pixels within which two objects count as touching: labels drawn edge to edge, or a gap
of up to three pixels between them."""


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


def contact_band(labels: np.ndarray, sigma: float = CONTACT_SIGMA) -> np.ndarray:
    """Where two objects meet: 1 on the pixels that have two different objects within
    two pixels, falling off as a Gaussian of the distance to them.

    Most AIS misses on held-out nuclei are touching pairs merged into one object; the
    line that parts them is a few pixels of a plane, too few for a Dice loss to notice.
    Weighting the loss by ``1 + w * band`` (U-Net's separation weights, Ronneberger et al.
    2015, with the distance to the contact in place of the sum of the distances to the two
    nearest cells) makes those pixels count.

    Parameters
    ----------
    labels
        (H, W) integer instance labels, 0 = background.
    sigma
        The band's Gaussian width in pixels.

    Returns
    -------
    numpy.ndarray
        (H, W) float32 in [0, 1]; all 0 where no two objects come within reach.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iub":
        raise ValueError(f"a contact band needs a 2D integer label image, not {labels.dtype} of shape {labels.shape}")
    labels = labels.astype(np.int64, copy=False)
    size = 2 * _CONTACT_REACH + 1
    # The largest and the smallest object id in reach (background left out of the
    # smallest): two different ones mean two objects within reach.
    largest = ndi.maximum_filter(labels, size=size, mode="constant", cval=0)
    blank = int(labels.max()) + 1  # the filters' cval goes through a float: keep it small
    smallest = ndi.minimum_filter(np.where(labels > 0, labels, blank), size=size, mode="constant", cval=blank)
    contact = (smallest != blank) & (largest != smallest)
    if not contact.any():
        return np.zeros(labels.shape, np.float32)
    distance = ndi.distance_transform_edt(~contact)
    return np.exp(-(distance**2) / (2 * sigma**2)).astype(np.float32)
