"""SAM as the automatic modes ask it: a decoder of their own, candidate logits brought to
full size a few at a time, and the embeddings of a single plane for the one-call
functions (:func:`~napari_sam.auto.grid.segment_grid`,
:func:`~napari_sam.auto.boxes.segment_detections`)."""

from __future__ import annotations

import numpy as np
import torch

from ..core.embeddings import Embeddings
from ..core.image_source import guess_axes
from ..core.masks import upscale_logits
from ..core.predictor import Predictor
from ..core.preprocess import Normalization

__all__: list[str] = []  # helpers of grid.py and boxes.py, not for users

# Full-size logits are made for this many candidates at a time: 16 x 1024^2 float32 is
# 64 MiB, whatever the batch size.
UPSCALE_CHUNK = 16


def decoder(embeddings: Embeddings) -> Predictor:
    """A predictor for the embeddings' model, to be given their tiles' embeddings."""
    # A predictor of our own: the embeddings' decoder may be serving the viewer. Its
    # batches run eagerly, so nothing is traced.
    return Predictor(embeddings.model, embeddings.normalization, traced=False)


@torch.inference_mode()
def full_logits(predictor: Predictor, low: np.ndarray) -> np.ndarray:
    """(N, S, S) low-res logits of the predictor's current embedding as (N, H, W) float32
    logits of its (tile's) plane region (:func:`~napari_sam.core.masks.upscale_logits`)."""
    emb = predictor.embedding
    full = upscale_logits(predictor.model, torch.as_tensor(low), emb.input_size, emb.original_size)
    return full.float().cpu().numpy()


def plane_embeddings(
    image, model, channel: int | None, tile: int | None, halo: int | None, normalization: Normalization
) -> Embeddings:
    """In-memory embeddings of one 2D plane: (H, W), (H, W, 3|4), or (H, W, C) with
    ``channel``."""
    image = np.asarray(image) if not hasattr(image, "shape") else image
    shape = tuple(image.shape)
    axes = None
    if len(shape) in (2, 3):
        # with a channel chosen the last axis is channels, whatever its size
        axes = "YXC" if len(shape) == 3 and channel is not None else guess_axes(shape)
    if axes not in ("YX", "YXC"):
        raise ValueError(
            f"expected one plane (H, W) or (H, W, C) with C = 3 or 4 or a channel, got shape {shape}; "
            "for a volume build an Embeddings and use the iter_* functions"
        )
    return Embeddings(
        image, model, cache=False, axes=axes, channel=channel, tile=tile, halo=halo, normalization=normalization
    )
