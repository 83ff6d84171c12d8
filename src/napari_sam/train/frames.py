"""A plane's pixels in SAM's frames: prompts in the model input, masks in the decoder's
low-res output, and the decoder's answer back at the plane's size.

The plane is resized so that its long side fills the square model input
(:func:`~napari_sam.core.preprocess.prepare_plane`) and padded at the bottom and right;
``input_size`` is the (h, w) it then occupies, ``original_size`` its (H, W) in pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..core.image_embedding import ImageEmbedding
from ..core.masks import upscale_logits

__all__ = ["low_res_targets", "model_scale", "predicted_masks", "upscale_low_res"]


def model_scale(input_size: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
    """Factors that take (x, y) plane pixels to the model-input frame.

    Exactly the predictor's mapping, so that a simulated click lands where the same click
    in the viewer would.

    Returns
    -------
    numpy.ndarray
        (2,) float64 ``(w / W, h / H)``; ``np.tile(scale, 2)`` scales boxes.
    """
    (h, w), (H, W) = input_size, original_size
    return np.array([w / W, h / H])


def low_res_targets(masks: torch.Tensor, input_size: tuple[int, int], image_size: int = 1024,
                    upscale: int = 1) -> torch.Tensor:
    """Ground-truth masks in the decoder's low-res frame, as {0, 1} floats.

    The plane is resized so that it occupies ``input_size`` of the padded square model
    input (as :func:`~napari_sam.core.preprocess.prepare_plane` resizes the image), padded
    at the bottom and right, and reduced 4x per side to the decoder's output grid: a
    low-res pixel belongs to the object when at least half of what it covers does. This
    is the inverse of :meth:`Sam.postprocess_masks`.

    Parameters
    ----------
    masks
        (N, H, W) boolean or {0, 1} masks at the plane's original size.
    input_size
        (h, w) of the resized plane inside the model input.
    image_size
        Side of the square model input (1024).
    upscale
        1, 2 or 4: the grid is that many times finer than the decoder's (4: the model
        input), for logits enlarged as :func:`upscale_low_res` enlarges them.

    Returns
    -------
    torch.Tensor
        (N, 1, G, G) float32 with ``G = upscale * image_size / 4``, on the masks' device.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {tuple(masks.shape)}")
    _check_upscale(upscale)
    h, w = input_size
    if not (0 < h <= image_size and 0 < w <= image_size):
        raise ValueError(f"input_size {input_size} does not fit a {image_size}x{image_size} model input")
    x = masks[:, None].float()
    if tuple(x.shape[-2:]) != (h, w):
        shrinking = h < x.shape[-2] or w < x.shape[-1]
        x = F.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=shrinking)
    x = F.pad(x, (0, image_size - w, 0, image_size - h))
    if upscale == 4:
        return (x >= 0.5).float()
    return (F.avg_pool2d(x, 4 // upscale) >= 0.5).float()


def upscale_low_res(low: torch.Tensor, upscale: int) -> torch.Tensor:
    """Low-res logits (..., S, S) enlarged ``upscale`` times by bilinear interpolation, as
    :meth:`Sam.postprocess_masks` enlarges them to the model input (1: unchanged), so that
    a loss on them judges the outline inference draws."""
    _check_upscale(upscale)
    if upscale == 1:
        return low
    lead, (s, t) = low.shape[:-2], low.shape[-2:]
    big = F.interpolate(low.reshape(-1, 1, s, t), (s * upscale, t * upscale), mode="bilinear", align_corners=False)
    return big.reshape(*lead, s * upscale, t * upscale)


def predicted_masks(model, low: torch.Tensor, emb: ImageEmbedding) -> np.ndarray:
    """The decoder's single-mask answers as masks of the plane, without gradient.

    Parameters
    ----------
    model
        The Sam that decoded.
    low
        (N, 1, S, S) low-res logits.
    emb
        The plane's embedding (its sizes place the logits).

    Returns
    -------
    numpy.ndarray
        (N, H, W) bool.
    """
    with torch.no_grad():
        full = upscale_logits(model, low.float(), emb.input_size, emb.original_size)
    return (full[:, 0] > model.mask_threshold).cpu().numpy()


def _check_upscale(upscale) -> None:
    # the finer grids that split a low-res pixel into whole pixels of the model input
    if isinstance(upscale, bool) or upscale not in (1, 2, 4):
        raise ValueError(f"upscale must be 1, 2 or 4, not {upscale!r}")
