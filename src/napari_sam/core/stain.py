"""Stained brightfield RGB read as its haematoxylin channel, where the model asks for it.

A model that learned nuclei mostly as bright shapes on a dark ground (fluorescence, and
the synthetic images of the embedded default model) meets H&E sections as dark purple
nuclei among pink tissue. Colour deconvolution (Ruifrok and Johnston 2001, as
``skimage.color.rgb2hed`` implements it) separates the haematoxylin stain's optical
density, which is high where nuclei are and low elsewhere: a plane much like a
fluorescence image of nuclei. A model asks for it in its checkpoint metadata
(``"stain": "haematoxylin"``); SAM's own weights and micro-sam's, trained on RGB, do not.

The choice is a *channel* of the image: ``channel="haematoxylin"`` reads that stain out of
the RGB triple of every pixel, ``channel="rgb"`` keeps the colours, and ``channel=None``
(the default everywhere) follows the model's advice for RGB planes that look like
brightfield (:func:`looks_brightfield`), never for fluorescence composites or grayscale.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["HAEMATOXYLIN", "RGB", "STAIN_CHANNELS", "haematoxylin", "float_white", "looks_brightfield",
           "stain_advice", "channel_for", "is_rgb", "plane_channel"]

HAEMATOXYLIN = "haematoxylin"
RGB = "rgb"
STAIN_CHANNELS = (HAEMATOXYLIN, RGB)
"""Named channels of an RGB image (beside channel numbers)."""

BRIGHTFIELD_RATIO = 0.35
"""A plane is brightfield when the median of each pixel's brightest channel is at least
this fraction of that channel's 99.5th percentile: the ground of a brightfield image is
bright, a fluorescence image's dark. Every H&E and brightfield image in the project's data
(35 tiles of four sources) lies at 0.47-0.95; fluorescence composites lie far below."""


def haematoxylin(rgb: np.ndarray, white: float | None = None) -> np.ndarray:
    """The haematoxylin optical density of an RGB image.

    Parameters
    ----------
    rgb
        (..., 3) or (..., 4) channels-last, any integer or float dtype: integers over
        their dtype's range, floats on the scale of ``white``; alpha is ignored.
    white
        For floats: the value of white. None: :func:`float_white` of ``rgb``. Give it
        when an image is read in pieces (tiles), so that every piece is scaled alike
        (:class:`~napari_sam.core.image_source.ImageSource` does, from a sample of the
        whole image).

    Returns
    -------
    numpy.ndarray
        float32 of shape ``rgb.shape[:-1]``: high where the stain is, about 0 on white.
    """
    from skimage.color import rgb2hed

    rgb = np.asarray(rgb)
    if rgb.shape[-1] not in (3, 4):
        raise ValueError(f"the haematoxylin channel is separated from RGB; got {rgb.shape[-1]} channels")
    flat = rgb[..., :3].reshape(-1, 1, 3)
    if flat.dtype.kind == "b":
        flat = flat.astype(np.uint8) * 255
    if flat.dtype.kind == "f":
        # rgb2hed reads floats as 0-1 intensities
        white = float_white(flat) if white is None else white
        flat = np.clip(flat / np.float32(white), 0.0, 1.0)
    return rgb2hed(flat)[..., 0].astype(np.float32).reshape(rgb.shape[:-1])


def float_white(values: np.ndarray) -> float:
    """The value of white for float RGB values: 0-1 intensities (overshooting a little:
    none above 2) have white at 1 or their largest value; others are 8-bit values, white
    at 255 or their largest value if that is larger (see :func:`haematoxylin`)."""
    top = float(np.nanmax(values)) if np.size(values) else 1.0
    return max(1.0, top) if not top > 2 else max(255.0, top)


def looks_brightfield(rgb: np.ndarray) -> bool:
    """Whether an RGB (..., 3|4) sample looks like a brightfield image (bright ground)."""
    brightest = np.asarray(rgb)[..., :3].max(axis=-1).astype(np.float64).ravel()
    brightest = brightest[np.isfinite(brightest)]
    if brightest.size == 0:
        return False
    top = np.percentile(brightest, 99.5)
    return bool(top > 0 and np.median(brightest) >= BRIGHTFIELD_RATIO * top)


def stain_advice(model) -> str | None:
    """The stain a model wants stained brightfield RGB read as (its metadata), or None."""
    advice = (getattr(model, "metadata", None) or {}).get("stain")
    if advice not in (None, HAEMATOXYLIN):
        raise ValueError(f"the model's metadata asks for stain {advice!r}; this version knows {HAEMATOXYLIN!r}")
    return advice


def is_rgb(image: np.ndarray, channel_axis: int | None = None) -> bool:
    """Whether one plane holds 3 or 4 channels (RGB(A)), last or at ``channel_axis``."""
    shape = np.shape(image)
    return len(shape) == 3 and shape[-1 if channel_axis is None else channel_axis] in (3, 4)


def plane_channel(model, image: np.ndarray, channel_axis: int | None = None, channel=None):
    """:func:`channel_for` of one in-memory plane."""
    return channel_for(model, channel, is_rgb(image, channel_axis),
                       lambda: np.moveaxis(np.asarray(image), -1 if channel_axis is None else channel_axis, -1))


def channel_for(model, channel, rgb: bool, sample: Callable[[], np.ndarray] | np.ndarray):
    """The channel to read: ``channel`` when given, else the model's stain advice for an
    RGB image whose ``sample`` (an (h, w, 3|4) array, or a callable returning one, read
    only when needed) looks like brightfield, else None (the image as it is)."""
    if channel is not None or not rgb or stain_advice(model) is None:
        return channel
    return HAEMATOXYLIN if looks_brightfield(sample() if callable(sample) else sample) else None
