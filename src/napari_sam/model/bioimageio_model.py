"""SAM answering box prompts as one ``forward``: the architecture that napari-sam's
bioimage.io model packages name.

A bioimage.io consumer builds the network from a callable and keyword arguments, loads
a state dict into it and calls ``forward`` with the package's input tensors. This module
is that callable: a :class:`~napari_sam.model.sam.Sam` (so the official parameter names
load as they are) built from the configuration that :func:`config_to_dict` writes, whose
``forward`` maps the inputs ``image`` and ``box`` to the outputs ``masks`` and ``iou``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .config import config_from_dict
from .sam import Sam

__all__ = ["BoxPromptedSam", "box_masks"]


class BoxPromptedSam(Sam):
    """SAM with a ``forward`` for the bioimage.io runtime: images and boxes in, one mask
    logit map and one predicted IoU per box out.

    Parameters
    ----------
    **config
        The model configuration as :func:`~napari_sam.model.config.config_to_dict` writes
        it (the ``architecture.kwargs`` of the package).
    """

    def __init__(self, **config: Any):
        super().__init__(config_from_dict(config))
        self.eval()

    def forward(self, image: torch.Tensor, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for boxes on already normalised model inputs: :func:`box_masks` of this model."""
        return box_masks(self, image, box)


def box_masks(sam: Sam, image: torch.Tensor, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's answer to box prompts, one image at a time: what a package's network computes.

    Parameters
    ----------
    sam
        Any SAM, in evaluation mode.
    image
        (B, 3, S, S) float: RGB intensities resized so that the longest side is S (the
        model's input size), padded at the bottom and right, and normalised with the
        pixel mean and standard deviation (the package's preprocessing does this last step).
    box
        (B, N, 4) float ``(x0, y0, x1, y1)`` in pixels of the model input (x = column,
        y = row), N boxes per image, each one object.

    Returns
    -------
    masks : (B, N, S, S) float32 mask logits in the model-input frame; ``> 0`` is the mask
    iou : (B, N) float32 predicted IoU of each mask
    """
    size = sam.config.image_size
    if image.ndim != 4 or tuple(image.shape[1:]) != (3, size, size):
        raise ValueError(f"image must be (B, 3, {size}, {size}), got {tuple(image.shape)}")
    if box.ndim != 3 or box.shape[0] != image.shape[0] or box.shape[-1] != 4:
        raise ValueError(f"box must be (B, N, 4) with B = {image.shape[0]}, got {tuple(box.shape)}")
    masks, ious = [], []
    for b in range(image.shape[0]):
        embedding = sam.image_encoder(image[b : b + 1].to(sam.encoder_dtype)).float()
        low, iou = sam.decode(embedding, boxes=box[b].float(), multimask_output=False)
        masks.append(F.interpolate(low, (size, size), mode="bilinear", align_corners=False)[:, 0])
        ious.append(iou[:, 0])
    return torch.stack(masks), torch.stack(ious)
