"""The magnification at which a plane is embedded: how many model-input pixels one image
pixel becomes.

A model segments objects best within a range of sizes in its own input. SAM enlarges
every image to its input, so a tile of ``image_size / m`` image pixels is embedded at
magnification ``m``; :func:`~napari_sam.core.tiling.default_tiling` turns a
magnification into that tile. Small nuclei (8-10 pixels across) cover two or three
pixels of the default model's low-resolution mask at magnification 1 and are segmented
far better at 2 (docs/default_model.md, "Scale").

A model states what it wants in its checkpoint metadata, under ``"scale"``:

* ``{"magnification": m}``: embed at ``m`` whatever the image;
* ``{"object_diameter": d}``: the object diameter, in model-input pixels, that it
  segments best; the magnification is then chosen per image from the objects' diameter,
  estimated by :func:`estimate_diameter` unless the user gives it;
* ``{"box_diameter": b}`` beside it: an object prompted with a box, or corrected after a
  click, is answered at the magnification that shows it ``b`` pixels across, whatever
  its plane's other objects measure (:mod:`napari_sam.core.object_scale`).

Models without that entry (the official SAM weights, micro-sam's) are embedded at
magnification 1, as they always were.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np

from ..model.sam import Sam

__all__ = ["MAGNIFICATIONS", "ObjectDiameters", "central_crop", "estimate_diameter", "magnification_for",
           "model_scale", "nearest_magnification"]

MAGNIFICATIONS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
"""The magnifications a diameter is rounded to: nearby estimates for planes of one data
set give one tile size, so one embedding cache serves them all. Never below 1: shrinking
planes of large nuclei to 0.5-0.75 lost on held-out DSB images (docs/default_model.md,
"Scale"); above 3 the tiles hold too little context."""

_SAMPLE = 1024  # side of the central crop the diameter is estimated on


def model_scale(model: Sam) -> dict:
    """The model's ``"scale"`` advice from its checkpoint metadata (empty if none)."""
    scale = getattr(model, "metadata", {}).get("scale") or {}
    return dict(scale) if isinstance(scale, dict) else {}


def central_crop(source, side: int = _SAMPLE, plane=None) -> np.ndarray:
    """The centre of a plane of an :class:`~napari_sam.core.image_source.ImageSource`
    (its middle plane by default; else a flat number or (t, z) tuple), at most ``side`` x
    ``side``: what :func:`estimate_diameter` reads, without reading the rest of a large
    plane."""
    H, W = source.plane_shape
    y0, x0 = max(0, (H - side) // 2), max(0, (W - side) // 2)
    plane = source.n_planes // 2 if plane is None else plane
    return source.read(plane, (y0, min(H, y0 + side), x0, min(W, x0 + side)))


RARE_BRIGHT_FRACTION = 0.05
"""The share of a plane's pixels under which the brightest of three grey-value classes
is taken for debris or a saturated band rather than objects (see
:func:`estimate_diameter`); chosen on the default model's training images
(docs/default_model.md, "Each box at its own scale, diameters read past bright
debris")."""


def estimate_diameter(plane: np.ndarray) -> float | None:
    """Typical diameter, in pixels, of the blob-like objects of a plane.

    Objects are told from background by Otsu's threshold on the grey values, the
    minority side taken as foreground (so dark nuclei on bright H&E count as well as
    bright ones on dark); a rare brightest class (debris, a saturated band: under 5 % of
    the pixels in a three-class split) is capped before the threshold is taken, so that
    it cannot lift the threshold above the objects; holes are filled and specks removed;
    each connected component's width is twice the largest distance from its boundary,
    which a chain of touching objects shares with its members. Only the central
    ``1024 x 1024`` crop is read, so the estimate is cheap on planes of any size.

    Parameters
    ----------
    plane
        ``(Y, X)`` or ``(Y, X, C)`` image plane, any dtype.

    Returns
    -------
    float or None
        The median component width weighted by area (pixels), or None where no objects are found
        (an empty or flat plane).
    """
    from scipy import ndimage as ndi
    from skimage.filters import gaussian, threshold_otsu

    plane = np.asarray(plane)
    if plane.ndim == 3 and plane.shape[-1] == 3:
        from skimage.color import rgb2hed

        # Stained tissue: nuclei are what the haematoxylin colours; grey values would
        # separate tissue from glass instead.
        plane = rgb2hed(plane)[..., 0]
    elif plane.ndim == 3:
        plane = plane.astype(np.float32).mean(axis=-1)
    if plane.ndim != 2:
        raise ValueError(f"estimate_diameter takes a (Y, X) or (Y, X, C) plane, got shape {plane.shape}")
    H, W = plane.shape
    y0, x0 = max(0, (H - _SAMPLE) // 2), max(0, (W - _SAMPLE) // 2)
    crop = plane[y0 : y0 + _SAMPLE, x0 : x0 + _SAMPLE].astype(np.float32)
    # A few saturated pixels (or stain-separation outliers) would drag Otsu's threshold.
    low, high = np.percentile(crop, [1, 99.5]) if crop.size else (0.0, 0.0)
    grey = gaussian(np.clip(crop, low, high), sigma=1.0)
    if not np.isfinite(grey).all() or float(grey.max() - grey.min()) <= 0:
        return None
    if (grey > threshold_otsu(grey)).mean() > 0.5:
        grey = -grey  # dark objects on a bright ground: make them the bright side
    fg = grey > threshold_otsu(_without_rare_bright_class(grey))
    # Texture inside stained nuclei leaves holes and specks: fill the holes, drop the specks.
    fg = ndi.binary_opening(ndi.binary_fill_holes(fg), iterations=1)
    components, n = ndi.label(fg)
    if n == 0:
        return None
    dist = ndi.distance_transform_edt(fg)
    index = np.arange(1, n + 1)
    # A component's width is twice its largest inscribed radius, which a chain of
    # touching objects shares with its members; weighting by area keeps specks from
    # outvoting the objects.
    width = 2.0 * np.asarray(ndi.maximum(dist, components, index))
    area = np.asarray(ndi.sum(fg, components, index))
    keep = area >= 9
    if not keep.any():
        return None
    width, area = width[keep], area[keep]
    order = np.argsort(width)
    cumulative = np.cumsum(area[order])
    return float(width[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def _without_rare_bright_class(grey: np.ndarray) -> np.ndarray:
    """``grey`` capped at the lower edge of its brightest class when that class is rare.

    A bright band of debris over a few percent of a plane pulls Otsu's two-class
    threshold up between the nuclei and the debris, so that the debris alone is measured
    (two of 21 DSB fluorescence planes estimated at twice their nuclei's diameter). A
    three-class split finds such a class; capped, it weighs no more than the nuclei."""
    from skimage.filters import threshold_multiotsu

    try:
        _, high = threshold_multiotsu(grey, classes=3)
    except ValueError:  # too few distinct values for three classes
        return grey
    if (grey > high).mean() < RARE_BRIGHT_FRACTION:
        return np.minimum(grey, high)
    return grey


def magnification_for(
    model: Sam,
    plane=None,
    magnification: float | str | None = None,
    diameter: float | Callable[[], float | None] | None = None,
) -> float:
    """The magnification to embed at.

    Parameters
    ----------
    model
        The model; its ``"scale"`` advice (:func:`model_scale`) applies when
        ``magnification`` is None or ``"auto"``.
    plane
        A representative ``(Y, X[, C])`` plane, or a function without arguments that
        reads one; used (called) only when the diameter must be estimated.
    magnification
        A number: used as it is. ``"auto"``: from the object diameter (needs the
        model's ``"object_diameter"``, else its fixed magnification or 1). None: the
        model's advice.
    diameter
        The objects' diameter in image pixels when the user knows it, or a function
        without arguments that returns it (None where nothing is found), called only
        when the model wants a diameter; otherwise it is estimated from ``plane``.

    Returns
    -------
    float
        A magnification from :data:`MAGNIFICATIONS` when chosen from a diameter,
        else the given or advised value (1 without advice).
    """
    if magnification is not None and not isinstance(magnification, str):
        value = float(magnification)
        if not (math.isfinite(value) and 0.1 <= value <= 8):
            raise ValueError(f"magnification must be between 0.1 and 8, got {magnification}")
        return value
    if isinstance(magnification, str) and magnification != "auto":
        raise ValueError(f"magnification must be a number, 'auto' or None, got {magnification!r}")
    if diameter is not None and not callable(diameter):
        _check_diameter(diameter)
    advice = model_scale(model)
    wanted = advice.get("object_diameter")
    if wanted is None:
        if diameter is not None and not callable(diameter):
            # Without the size the model wants, a diameter says nothing about the magnification.
            raise ValueError("this model does not record the object size it segments best (no 'object_diameter' "
                             "in its metadata): give a magnification instead of a diameter")
        return float(advice.get("magnification", 1.0))
    if callable(diameter):
        diameter = diameter()
    elif diameter is None and plane is not None:
        diameter = estimate_diameter(plane() if callable(plane) else plane)
    if diameter is None:  # nothing found to measure
        return float(advice.get("magnification", 1.0))
    return nearest_magnification(float(wanted) / float(diameter))


def _check_diameter(diameter) -> None:
    if not (math.isfinite(float(diameter)) and diameter > 0):
        raise ValueError(f"the object diameter must be a positive number of pixels, got {diameter}")


class ObjectDiameters:
    """The objects' diameter on each plane of an image, in plane pixels.

    The user's diameter where given, for every plane; otherwise :func:`estimate_diameter`
    on the plane's :func:`central_crop`, made once per plane and kept, since both the
    magnification of an image's embeddings and AIS's smoothing on stained planes ask for
    it, the latter on every run.

    Parameters
    ----------
    source
        The image's :class:`~napari_sam.core.image_source.ImageSource`, as embedded (its
        channel chosen).
    given
        The diameter the user knows, in plane pixels; None to estimate.
    """

    def __init__(self, source, given: float | None = None):
        if given is not None:
            _check_diameter(given)
        self.source = source
        self.given = None if given is None else float(given)
        self._estimates: dict[int, float | None] = {}
        self._lock = threading.Lock()

    def of(self, plane=None) -> float | None:
        """The diameter on a plane (flat number or (t, z) tuple; the middle plane by
        default), None where the estimate finds no objects."""
        if self.given is not None:
            return self.given
        flat = self.source.n_planes // 2 if plane is None else self.source.flat_index(plane)
        with self._lock:
            if flat in self._estimates:
                return self._estimates[flat]
        value = estimate_diameter(central_crop(self.source, plane=flat))
        with self._lock:
            return self._estimates.setdefault(flat, value)


def nearest_magnification(ratio: float) -> float:
    """The magnification of :data:`MAGNIFICATIONS` nearest ``ratio`` on a log scale (1.5 is
    as far from 1 as from 2.25)."""
    return min(MAGNIFICATIONS, key=lambda m: abs(math.log(m / ratio)))
