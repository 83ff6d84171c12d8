"""The SAM embedding of one plane (or tile), with the sizes that map prompts and masks
between the plane's pixels and the model's square input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .preprocess import preprocess_shape

__all__ = ["ImageEmbedding"]


@dataclass(frozen=True)
class ImageEmbedding:
    """The SAM embedding of one plane (or tile), with the sizes that map prompts and masks.

    Attributes
    ----------
    features
        (1, 256, 64, 64) float32 tensor.
    input_size
        (h, w) of the resized plane inside the padded 1024x1024 model input.
    original_size
        (H, W) of the plane in pixels.
    """

    features: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]

    @classmethod
    def from_array(cls, features, original_size: tuple[int, int], long_side: int = 1024) -> "ImageEmbedding":
        """Wrap a stored (1, 256, 64, 64) or (256, 64, 64) array (e.g. from a cache)."""
        t = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[1] != 256 or t.shape[2] != t.shape[3]:
            raise ValueError(f"an embedding has shape (1, 256, S, S) (S = 64 for SAM), got {tuple(t.shape)}")
        h, w = (int(s) for s in original_size)
        return cls(t, preprocess_shape(h, w, long_side), (h, w))
