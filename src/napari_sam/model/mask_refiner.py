"""Sharpening a prompted mask with the pixels it was predicted on.

SAM's mask decoder predicts logits on a grid four times finer than the image embedding:
64 x 64 for the default model's 256-pixel input, so each logit covers 4 x 4 input pixels
and the mask's outline is the bilinear enlargement of that grid. Nothing in the decoder
looks at the pixels themselves, so a nucleus's edge is where the embedding guessed it. This
head (ours; the official model has nothing like it) reads the enlarged logits of one mask
and the model input beside them, and adds a correction: the same convolutional head as the
instance decoder's :class:`~napari_sam.model.image_refiner.ImageRefiner`, without decoder
features and with one output map. Its last layer starts at zero, so an untrained head
changes nothing.

It works on a window around each mask (its bounding box plus a margin wider than what the
head sees) and leaves the rest of the enlarged logits as they were: a click costs a few
milliseconds more, not a full-input convolution.

Its weights live in a checkpoint beside the SAM weights, under ``"mask_refiner_state"``
(:data:`MASK_REFINER_KEY`), as micro-sam keeps its instance decoder beside them: the
official key layout stays as it is.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.nn import functional as F

from .image_refiner import IMAGE_FEATURES, ImageRefiner
from .mask_chooser import CHOOSER_PREFIX, MaskChooser, mask_chooser_from_state_dict

__all__ = ["MASK_REFINER_KEY", "MaskRefiner", "mask_refiner_from_state_dict"]

MASK_REFINER_KEY = "mask_refiner_state"
"""Top-level checkpoint entry that holds a :class:`MaskRefiner`'s state dict."""

LOGIT_CLIP = 20.0
"""The head reads logits clipped to +-this: far from the outline SAM's logits run to
hundreds, which says nothing more about where the edge is."""

WINDOW_MARGIN = 24
"""Pixels around a mask's bounding box that its window adds: the head sees 37 pixels across at
depth 5 (18 to each side), so a window this wide lets it move the outline by that much."""


class MaskRefiner(ImageRefiner):
    """Corrects one prompted mask's logits from the model input's pixels.

    Parameters
    ----------
    width
        Channels of the hidden layers.
    depth
        3x3 layers after the image's own two (see
        :func:`~napari_sam.model.image_refiner.dilations`).
    """

    def __init__(self, width: int = 16, depth: int = 5):
        super().__init__(0, width, 1, depth)
        # The head that chooses among a lone click's masks, when the checkpoint has one: it
        # reads the same pixels and travels with this head (its keys ``chooser.*``).
        self.chooser: MaskChooser | None = None

    def refine(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Refined logits of each mask, in the model-input frame.

        Parameters
        ----------
        logits
            (N, 1, S, S) mask logits enlarged to the model input (S = the input size, 256
            for the default model), e.g. SAM's low-res logits enlarged bilinearly.
        image
            (1, 3, S, S) the model input the embedding was computed from (normalised by the
            model's pixel statistics, zero-padded; :meth:`Predictor.model_input
            <napari_sam.core.predictor.Predictor.model_input>`).

        Returns
        -------
        torch.Tensor
            (N, 1, S, S) logits; outside each mask's window, the input's. An empty mask comes
            back unchanged.
        """
        out = logits.clone()
        size = logits.shape[-1]
        grey = image[:1].to(logits.dtype)
        for i in range(logits.shape[0]):
            rows, cols = torch.nonzero(logits[i, 0] > 0, as_tuple=True)
            if rows.numel() == 0:
                continue
            r0, r1 = max(0, int(rows.min()) - WINDOW_MARGIN), min(size, int(rows.max()) + 1 + WINDOW_MARGIN)
            c0, c1 = max(0, int(cols.min()) - WINDOW_MARGIN), min(size, int(cols.max()) + 1 + WINDOW_MARGIN)
            window = logits[i : i + 1, :, r0:r1, c0:c1].clamp(-LOGIT_CLIP, LOGIT_CLIP)
            none = window.new_zeros((1, 0, r1 - r0, c1 - c0))
            out[i : i + 1, :, r0:r1, c0:c1] = self(none, window, grey[..., r0:r1, c0:c1])
        return out

    def refine_low_res(self, low: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """:meth:`refine` for SAM's (N, 1, s, s) low-res logits: enlarged bilinearly to the
        image's side first (as :meth:`Sam.postprocess_masks <napari_sam.model.sam.Sam.postprocess_masks>`
        does), refined there; (N, 1, S, S) logits in the model-input frame."""
        size = tuple(image.shape[-2:])
        return self.refine(F.interpolate(low, size, mode="bilinear", align_corners=False), image)


def mask_refiner_from_state_dict(state: Mapping[str, torch.Tensor]) -> MaskRefiner:
    """A :class:`MaskRefiner` with exactly the weights of ``state`` (its width and depth read
    from the shapes; every key used), with its :attr:`~MaskRefiner.chooser` when ``state``
    holds one (keys ``chooser.*``).

    Raises
    ------
    ValueError
        Naming the keys that do not fit, for a state dict that is not a mask refiner's.
    """
    chooser = {k[len(CHOOSER_PREFIX):]: v for k, v in state.items() if k.startswith(CHOOSER_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(CHOOSER_PREFIX)}
    first = state.get("body.0.weight")
    if first is None or first.dim() != 4 or first.shape[1] != 1 + IMAGE_FEATURES:
        found = None if first is None else tuple(first.shape)
        raise ValueError(f"not a mask refiner's state: body.0.weight is {found}, "
                         f"expected (width, {1 + IMAGE_FEATURES}, 3, 3)")
    refiner = MaskRefiner(int(first.shape[0]), ImageRefiner.depth_of(state, prefix=""))
    try:
        result = refiner.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    except RuntimeError as error:  # misshapen keys
        raise ValueError(f"mask refiner state does not fit: {error}") from None
    wrong = [*result.missing_keys, *result.unexpected_keys]
    if wrong:
        raise ValueError(f"mask refiner state does not fit; keys missing or unexpected: {wrong}")
    if chooser:
        refiner.chooser = mask_chooser_from_state_dict(chooser)
    return refiner.eval()
