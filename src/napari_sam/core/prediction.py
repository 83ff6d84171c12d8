"""What a prompt set gets back: candidate masks with their predicted IoU, upscaled lazily.

The low-res logits are kept (a later prompt sends them back as its mask prompt) and the
full-size masks are computed from them only when asked for, one mask at a time when only
one is needed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Prediction"]


class Prediction:
    """Masks predicted for one prompt set (or a batch of them).

    Full-size masks are computed from the low-res logits when first asked for, and
    :meth:`best_mask` upscales only the winning mask: a click in the viewer needs one
    mask, not three.

    Attributes
    ----------
    iou
        (C,) or (B, C) predicted IoU of each mask.
    low_res_logits
        (C, 256, 256) or (B, C, 256, 256) logits: the mask decoder's own.
    """

    def __init__(self, iou: np.ndarray, low_res_logits: np.ndarray, upscale, return_logits: bool = False,
                 refine_low_res=None):
        self.iou = iou
        self.low_res_logits = low_res_logits
        self._upscale = upscale
        self._return_logits = return_logits
        self._refine_low_res = refine_low_res
        self._masks: np.ndarray | None = None
        self._prompt_logits: np.ndarray | None = None

    @property
    def prompt_logits(self) -> np.ndarray:
        """The logits to send back as a later ``mask_input`` (the shape of
        :attr:`low_res_logits`): the masks as they were shown, so that a correcting click
        and the mask prompt tell the decoder the same story. The decoder's own logits,
        unless a mask refiner sharpened the masks: then the refined logits, averaged back
        onto the low-res grid."""
        if self._prompt_logits is None:
            refine = self._refine_low_res
            self._prompt_logits = self.low_res_logits if refine is None else refine(self.low_res_logits)
        return self._prompt_logits

    def _full_size(self, low: np.ndarray) -> np.ndarray:
        return self._upscale(low, self._return_logits)

    @property
    def masks(self) -> np.ndarray:
        """(C, H, W) bool masks at the original size (float logits with
        ``return_logits``); (B, C, H, W) for a batch."""
        if self._masks is None:
            self._masks = self._full_size(self.low_res_logits)
        return self._masks

    @property
    def best(self) -> int | np.ndarray:
        """Index of the mask with the highest predicted IoU (per prompt set)."""
        return np.argmax(self.iou, axis=-1)

    def best_mask(self) -> np.ndarray:
        """The highest-scoring mask: (H, W), or (B, H, W) for a batch."""
        idx = self.best
        if self._masks is not None:
            if self._masks.ndim == 3:
                return self._masks[idx]
            return self._masks[np.arange(self._masks.shape[0]), idx]
        if self.low_res_logits.ndim == 3:
            return self._full_size(self.low_res_logits[idx : idx + 1])[0]
        rows = np.arange(self.low_res_logits.shape[0])
        return self._full_size(self.low_res_logits[rows, idx][:, None])[:, 0]

    def mask(self, k: int) -> np.ndarray:
        """The k-th mask of a single prompt set at the original size; upscales only that
        one (unless all were computed already)."""
        if self.low_res_logits.ndim != 3:
            raise ValueError("mask(k) is for a single prompt set; index the batch first")
        if self._masks is not None:
            return self._masks[k]
        return self._full_size(self.low_res_logits[k : k + 1])[0]

    def __getitem__(self, i: int) -> "Prediction":
        """The prediction for the i-th prompt set of a batch."""
        return Prediction(self.iou[i], self.low_res_logits[i], self._upscale, self._return_logits,
                          self._refine_low_res)
