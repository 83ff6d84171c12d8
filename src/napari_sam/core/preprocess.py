"""From a microscopy plane of any dtype and channel layout to SAM's model input.

SAM was trained on 8-bit RGB photographs. Microscopy planes are 8-, 16- or 32-bit,
grayscale or multichannel, with intensities that fill a small part of their range.
Three steps bring one to the other:

1. **Channels** (:func:`to_rgb`): a grayscale plane is repeated into R, G and B; an
   RGB(A) plane keeps its first three channels; a multichannel plane contributes the
   channel chosen by the caller.
2. **Intensities** (:class:`Normalization`): values are mapped linearly so that the
   ``low`` and ``high`` percentiles of the plane (or given fixed limits, for example
   statistics of a whole volume so that all planes and tiles agree) become 0 and 255,
   and clipped. ``uint8`` data is passed through unchanged by default, since it is
   already on the scale SAM expects.
3. **Geometry** (:func:`resize_longest_side`): the longest side is resized to 1024 with
   antialiasing; the model pads the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["IntensityLimits", "Normalization", "to_rgb", "resize_longest_side", "preprocess_shape", "prepare_plane"]


@dataclass(frozen=True)
class Normalization:
    """How intensities are mapped to SAM's 0-255 range.

    Parameters
    ----------
    mode
        ``"auto"`` (default): ``"none"`` for uint8 data, ``"percentile"`` otherwise.
        ``"percentile"``: the ``low``/``high`` percentiles of the plane become 0/255.
        ``"fixed"``: ``limits`` become 0/255 (use this with statistics of a whole volume).
        ``"none"``: values are used as they are (they should lie in 0-255).
    low, high
        Percentiles for ``"percentile"`` mode; 1 and 99.8 by default, which ignores hot
        pixels and the darkest background without clipping much of the signal.
    limits
        ``(lower, upper)`` intensity values for ``"fixed"`` mode.
    """

    mode: str = "auto"
    low: float = 1.0
    high: float = 99.8
    limits: tuple[float, float] | None = None

    def __post_init__(self):
        if self.mode not in ("auto", "percentile", "fixed", "none"):
            raise ValueError(f"normalization mode must be auto, percentile, fixed or none, not {self.mode!r}")
        if not 0 <= self.low < self.high <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.low}, {self.high}")
        if self.mode == "fixed" and self.limits is None:
            raise ValueError("normalization mode 'fixed' needs limits=(lower, upper)")

    def resolve_limits(
        self, data: np.ndarray | Callable[[], np.ndarray], dtype: np.dtype | None = None
    ) -> tuple[float, float] | None:
        """Intensity limits, or None when values pass through unchanged.

        Parameters
        ----------
        data
            The values (any shape), or a callable returning them: a sample is then read
            only when percentiles are needed.
        dtype
            The image's dtype (default: that of ``data``; needed with a callable).
        """
        mode = self.mode
        if mode == "auto":
            kind = np.dtype(dtype) if dtype is not None else np.asarray(data).dtype
            mode = "none" if kind == np.uint8 else "percentile"
        if mode == "none":
            return None
        if mode == "fixed":
            if self.limits is None:  # __post_init__ already refuses this; it narrows the type
                raise ValueError("normalization mode 'fixed' needs limits=(lower, upper)")
            return float(self.limits[0]), float(self.limits[1])
        values = np.asarray(data() if callable(data) else data)
        if values.dtype == bool:
            values = values.view(np.uint8)  # numpy has no percentile of bools
        if values.dtype.kind == "f":
            values = values[np.isfinite(values)]  # one NaN pixel must not make every limit NaN
        if values.size == 0:
            return 0.0, 0.0  # nothing to stretch: apply() gives a black plane
        lo, hi = np.percentile(values, [self.low, self.high])
        return float(lo), float(hi)

    def apply(self, data: np.ndarray, limits: tuple[float, float] | None = None) -> np.ndarray:
        """Map ``data`` to float32 values in [0, 255]."""
        if limits is None:
            limits = self.resolve_limits(data)
        if limits is None:
            return data.astype(np.float32, copy=False)
        lo, hi = limits
        if hi <= lo:
            # A constant plane (an empty tile, say) has no contrast to stretch.
            return np.zeros(data.shape, np.float32)
        out = (data.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
        out[np.isnan(out)] = 0.0  # missing values (NaN) are background, not a NaN plane
        return np.clip(out, 0.0, 255.0, out=out)


class IntensityLimits:
    """The intensity limits each plane of an image is normalised with, computed once.

    Parameters
    ----------
    source
        The :class:`~napari_sam.core.image_source.ImageSource` (its ``intensity_limits``
        and ``flat_index``).
    normalization
        How intensities map to 0-255.
    statistics
        ``"volume"``: the limits of the whole image, so that all planes and tiles agree;
        ``"plane"``: each plane's own.
    """

    def __init__(self, source, normalization: "Normalization", statistics: str = "volume"):
        if statistics not in ("volume", "plane"):
            raise ValueError(f"statistics must be 'volume' or 'plane', not {statistics!r}")
        self.source, self.normalization, self.statistics = source, normalization, statistics
        self.volume: tuple[float, float] | None = (
            source.intensity_limits(normalization) if statistics == "volume" else None)
        self._planes: dict[int, tuple[float, float] | None] = {}

    def for_plane(self, plane) -> tuple[float, float] | None:
        """The (low, high) limits of a plane (flat number or tuple); None where the
        normalisation needs none."""
        if self.statistics == "volume":
            return self.volume
        flat = self.source.flat_index(plane)
        if flat not in self._planes:
            self._planes[flat] = self.source.intensity_limits(self.normalization, plane=flat)
        return self._planes[flat]


def to_rgb(image: np.ndarray, channel_axis: int | None = None, channel: int | str | None = None) -> np.ndarray:
    """Return a (H, W, 3) view or copy of a 2D plane.

    Parameters
    ----------
    image
        (H, W) grayscale, (H, W, C) channels-last, or channels at ``channel_axis``.
    channel_axis
        Axis holding channels. None: a 3D array whose last axis has 3 or 4 entries is
        taken as RGB(A); any other 3D array is refused as ambiguous.
    channel
        Which channel to use (repeated into RGB). None or ``"rgb"`` with 3 or 4 channels
        means RGB; ``"haematoxylin"`` that stain's optical density separated from RGB
        (:mod:`napari_sam.core.stain`).

    Raises
    ------
    ValueError
        For arrays that are not one plane, or an unusable channel choice.
    """
    image = np.asarray(image)
    if isinstance(channel, str):
        return _named_channel(image, channel_axis, channel)
    if image.ndim == 2:
        if channel_axis is not None:
            raise ValueError(f"channel_axis={channel_axis} given, but the image is 2D with shape {image.shape}")
        return np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3:
        raise ValueError(
            f"expected one 2D plane (H, W) or (H, W, C), got an array of shape {image.shape}; "
            "index the plane you want (e.g. volume[z]) or use the volume API"
        )
    if channel_axis is None:
        if image.shape[-1] not in (3, 4):
            raise ValueError(
                f"got a 3D array of shape {image.shape}: the 2D predictor takes one plane. "
                "Pass a single plane (e.g. volume[z]), or set channel_axis if one axis holds channels"
            )
        channel_axis = -1
    image = np.moveaxis(image, channel_axis, -1)
    n = image.shape[-1]
    if channel is not None:
        if not -n <= channel < n:
            raise ValueError(f"channel {channel} does not exist; the image has {n} channels")
        return np.repeat(image[..., channel : channel + 1 if channel != -1 else None], 3, axis=-1)
    if n in (3, 4):
        return image[..., :3]
    if n == 1:
        return np.repeat(image, 3, axis=-1)
    raise ValueError(f"the image has {n} channels: choose one with channel=... (--channel on the command line)")


def _named_channel(image: np.ndarray, channel_axis: int | None, channel: str) -> np.ndarray:
    from .stain import RGB, STAIN_CHANNELS, haematoxylin

    if channel not in STAIN_CHANNELS:
        raise ValueError(f"channel {channel!r} is not a channel number or one of {', '.join(STAIN_CHANNELS)}")
    if image.ndim != 3 or image.shape[-1 if channel_axis is None else channel_axis] not in (3, 4):
        raise ValueError(f"channel {channel!r} needs an RGB(A) plane, got shape {image.shape}")
    rgb = to_rgb(image, channel_axis)
    if channel == RGB:
        return rgb
    return np.repeat(haematoxylin(rgb)[..., None], 3, axis=-1)


def preprocess_shape(height: int, width: int, long_side: int = 1024) -> tuple[int, int]:
    """Shape (h, w) after resizing so that the longest side equals ``long_side``
    (rounded as the official SAM transform rounds)."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_longest_side(rgb: np.ndarray, long_side: int = 1024) -> torch.Tensor:
    """Resize a (H, W, 3) float plane to a (1, 3, h, w) tensor with the longest side
    ``long_side``; antialiased when shrinking."""
    h, w = preprocess_shape(rgb.shape[0], rgb.shape[1], long_side)
    x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
    if (h, w) == tuple(rgb.shape[:2]):
        return x
    shrinking = h < rgb.shape[0]
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=shrinking).clamp_(0, 255)


def prepare_plane(
    image: np.ndarray,
    normalization: Normalization = Normalization(),
    channel_axis: int | None = None,
    channel: int | str | None = None,
    limits: tuple[float, float] | None = None,
    long_side: int = 1024,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Channels, intensities and geometry in one call.

    Returns
    -------
    x : (1, 3, h, w) float32 tensor with values in [0, 255] and longest side ``long_side``
    original_size : (H, W) of the plane

    Raises
    ------
    ValueError
        For arrays that are not a plane, empty planes and planes holding NaN or inf.
    """
    rgb = to_rgb(image, channel_axis, channel)
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"the image is empty: shape {np.shape(image)}")
    if rgb.dtype.kind not in "uifb":
        raise ValueError(f"cannot segment an image of dtype {rgb.dtype}")
    if rgb.dtype.kind == "f":
        bad = ~np.isfinite(rgb).all(axis=-1)
        if bad.any():
            raise ValueError(
                f"the image holds NaN or infinite values at {int(bad.sum())} pixel(s); replace them first "
                "(e.g. numpy.nan_to_num(image, nan=0.0))"
            )
    if rgb.dtype == np.bool_:
        rgb = rgb.astype(np.uint8) * 255
    scaled = normalization.apply(rgb, limits)
    return resize_longest_side(scaled, long_side), (int(rgb.shape[0]), int(rgb.shape[1]))
