"""Prompts simulated from ground-truth masks, the way SAM was trained.

Training starts every object with one prompt drawn from its ground-truth mask: a point
inside it or its bounding box (with a little noise, as a person's box is never exact).
Later iterations add a corrective click in the error region of the previous prediction:
a foreground point where the object was missed, a background point where the
prediction spilled over, whichever error is larger.

Coordinates are (x, y) = (column, row) in pixels of the mask, as the predictor takes
them; boxes are (x0, y0, x1, y1) with x1, y1 the last column and row of the object
(inclusive, as SAM's training boxes). Randomness comes from a ``numpy.random.Generator``
so that a seed reproduces a run.
"""

from __future__ import annotations

import numpy as np

from .masks import bounding_box as exact_box
from .masks import deepest_pixel, depth

__all__ = [
    "FOREGROUND",
    "BACKGROUND",
    "random_point",
    "interior_point",
    "central_point",
    "bounding_box",
    "error_regions",
    "corrective_point",
]

FOREGROUND = 1
BACKGROUND = 0

_PLACEMENTS = ("center", "random")


def _mask(mask, name: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2D (H, W) array, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _nonempty(mask: np.ndarray, name: str = "mask") -> None:
    if not mask.any():
        raise ValueError(f"{name} is empty: an object needs at least one foreground pixel")


def _deepest(mask: np.ndarray, rng: np.random.Generator | None) -> tuple[int, int]:
    """(row, col) of the pixel of a non-empty mask farthest from its boundary."""
    pixel = deepest_pixel(depth(mask), rng=rng)
    if pixel is None:  # callers check for pixels first; an empty mask has no inside
        raise ValueError("mask is empty: an object needs at least one foreground pixel")
    return pixel


def _xy(row: int, col: int) -> np.ndarray:
    return np.array([col, row], dtype=np.float64)


def random_point(mask, rng: np.random.Generator) -> np.ndarray:
    """A foreground point drawn uniformly from the object's pixels.

    Parameters
    ----------
    mask
        (H, W) boolean (or 0/1) mask of one object.
    rng
        Source of randomness.

    Returns
    -------
    numpy.ndarray
        (2,) float64 ``(x, y)``, the column and row of a pixel of the object.

    Raises
    ------
    ValueError
        For a mask that is not 2D or is empty.
    """
    mask = _mask(mask)
    _nonempty(mask)
    rows, cols = np.nonzero(mask)
    i = int(rng.integers(rows.size))
    return _xy(rows[i], cols[i])


def interior_point(mask, rng: np.random.Generator | None = None) -> np.ndarray:
    """The object's pixel farthest from its boundary: where a person would click.

    Parameters
    ----------
    mask
        (H, W) mask of one object.
    rng
        Breaks ties between equally central pixels at random; the first in row-major
        order when None.

    Returns
    -------
    numpy.ndarray
        (2,) float64 ``(x, y)``.

    Raises
    ------
    ValueError
        For a mask that is not 2D or is empty.
    """
    mask = _mask(mask)
    _nonempty(mask)
    return _xy(*_deepest(mask, rng))


def central_point(mask, rng: np.random.Generator, depth_fraction: float = 0.5) -> np.ndarray:
    """A point drawn uniformly from the object's inner part: where people click.

    People click near an object's middle, not anywhere in it; this draws from the pixels
    at least ``depth_fraction`` of the deepest pixel's distance from the boundary, so that
    a model trained on it expects the whole object from such a click.

    Parameters
    ----------
    mask
        (H, W) mask of one object.
    rng
        Source of randomness.
    depth_fraction
        0 draws from every pixel (as :func:`random_point`), 1 from the deepest pixels only
        (as :func:`interior_point`).

    Returns
    -------
    numpy.ndarray
        (2,) float64 ``(x, y)``.

    Raises
    ------
    ValueError
        For a mask that is not 2D or is empty, or a fraction outside [0, 1].
    """
    if not 0.0 <= depth_fraction <= 1.0:
        raise ValueError(f"depth_fraction must be within [0, 1], got {depth_fraction}")
    mask = _mask(mask)
    _nonempty(mask)
    d = depth(mask)
    rows, cols = np.nonzero(mask & (d >= depth_fraction * d.max()))  # depth is 0 outside too
    i = int(rng.integers(rows.size))
    return _xy(rows[i], cols[i])


def bounding_box(
    mask,
    rng: np.random.Generator | None = None,
    noise: float = 0.0,
    max_noise: float = 20.0,
) -> np.ndarray:
    """The object's bounding box, optionally jittered like a hand-drawn box.

    Each coordinate moves by Gaussian noise whose standard deviation is ``noise`` times
    the box's width (x) or height (y), clipped to ``max_noise`` pixels (SAM: 10 %, at most
    20 pixels); the result is clipped to the image and kept ordered.

    Parameters
    ----------
    mask
        (H, W) mask of one object.
    rng
        Needed when ``noise > 0``.
    noise
        Standard deviation as a fraction of the box side; 0 gives the exact box.
    max_noise
        Largest shift of a coordinate, in pixels.

    Returns
    -------
    numpy.ndarray
        (4,) float64 ``(x0, y0, x1, y1)``, with x1 and y1 the last column and row.

    Raises
    ------
    ValueError
        For an empty mask, negative noise, or noise without a generator.
    """
    mask = _mask(mask)
    _nonempty(mask)
    if noise < 0 or max_noise < 0:
        raise ValueError(f"noise and max_noise must be >= 0, got {noise} and {max_noise}")
    box = exact_box(mask)
    if noise == 0:
        return box
    if rng is None:
        raise ValueError("a noisy box needs a random generator (rng)")
    side = np.array([box[2] - box[0] + 1, box[3] - box[1] + 1], dtype=np.float64)
    std = noise * np.tile(side, 2)
    box = box + np.clip(rng.normal(0.0, std), -max_noise, max_noise)
    H, W = mask.shape
    box = np.clip(box, 0, [W - 1, H - 1, W - 1, H - 1])
    x0, x1 = sorted(box[[0, 2]])
    y0, y1 = sorted(box[[1, 3]])
    return np.array([x0, y0, x1, y1])


def error_regions(target, prediction) -> tuple[np.ndarray, np.ndarray]:
    """Where a prediction is wrong.

    Parameters
    ----------
    target
        (H, W) ground-truth mask of the object.
    prediction
        (H, W) predicted mask, same shape.

    Returns
    -------
    false_negative : numpy.ndarray
        Object pixels the prediction missed.
    false_positive : numpy.ndarray
        Predicted pixels outside the object.

    Raises
    ------
    ValueError
        When the two masks differ in shape.
    """
    target = _mask(target, "target")
    prediction = _mask(prediction, "prediction")
    if target.shape != prediction.shape:
        raise ValueError(f"target {target.shape} and prediction {prediction.shape} differ in shape")
    return target & ~prediction, prediction & ~target


def corrective_point(
    target,
    prediction,
    rng: np.random.Generator,
    placement: str = "center",
) -> tuple[np.ndarray, int] | None:
    """The next click a person would make to correct a prediction.

    The larger of the two error regions decides: missed object pixels (false negatives)
    call for a foreground point, spill-over (false positives) for a background point. The
    point lies inside that region.

    Parameters
    ----------
    target
        (H, W) ground-truth mask of the object.
    prediction
        (H, W) the previous predicted mask.
    rng
        Source of randomness (ties, random placement).
    placement
        ``"center"``: the error pixel farthest from the region's boundary (ties broken at
        random), a deliberate click in the middle of the mistake. ``"random"``: any pixel
        of the region, uniformly.

    Returns
    -------
    (point, label) or None
        ``point`` is (2,) float64 ``(x, y)``; ``label`` is :data:`FOREGROUND` (1) or
        :data:`BACKGROUND` (0). None when the prediction is perfect.

    Raises
    ------
    ValueError
        For masks of different shapes or an unknown placement.
    """
    if placement not in _PLACEMENTS:
        raise ValueError(f"placement must be one of {_PLACEMENTS}, not {placement!r}")
    fn, fp = error_regions(target, prediction)
    n_fn, n_fp = int(fn.sum()), int(fp.sum())
    if n_fn == 0 and n_fp == 0:
        return None
    # Ties go to the missed object: adding to the object is the more common correction.
    region, label = (fn, FOREGROUND) if n_fn >= n_fp else (fp, BACKGROUND)
    if placement == "center":
        row, col = _deepest(region, rng)
    else:
        rows, cols = np.nonzero(region)
        i = int(rng.integers(rows.size))
        row, col = int(rows[i]), int(cols[i])
    return _xy(row, col), label
