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
        (1, 256, E, E) float32 tensor: E = S / 16 for a model input of S x S pixels
        (64 for SAM's 1024, 16 for the default model's 256).
    input_size
        (h, w) of the resized plane inside the padded S x S model input.
    original_size
        (H, W) of the plane in pixels.
    """

    features: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]

    @classmethod
    def from_array(cls, features, original_size: tuple[int, int], long_side: int | None = None) -> "ImageEmbedding":
        """Wrap a stored (1, 256, E, E) or (256, E, E) array (e.g. from a cache).

        ``long_side``: the side S of the model input the features were computed from; by
        default 16 E, as every image encoder here has 16-pixel patches (1024 for SAM's
        64 x 64 features, 256 for the default model's 16 x 16)."""
        t = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[1] != 256 or t.shape[2] != t.shape[3]:
            raise ValueError(f"an embedding has shape (1, 256, S, S) (S = 64 for SAM), got {tuple(t.shape)}")
        h, w = (int(s) for s in original_size)
        side = 16 * int(t.shape[-1]) if long_side is None else int(long_side)
        return cls(t, preprocess_shape(h, w, side), (h, w))
