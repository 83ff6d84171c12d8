"""A small convolutional head that sharpens an instance decoder's maps with the image.

An instance decoder reads nothing but the image embedding: 16 model-input pixels per
token. The default model's encoder takes 256-pixel inputs, so a nucleus 30 input pixels
across spans two tokens, and the faint dark line between two touching nuclei is below
what the embedding can carry: AIS merged them (most misses on held-out DSB images were
merges). torch-em's UNETR offers a skip from the input image for this
(``use_skip_connection``); micro-sam's checkpoints do not use it, and at 256 pixels a
full UNETR skip path costs more than the rest of the decoder. This head is our own,
lighter answer: at the model input's full resolution it reads

- the decoder's last features and its three logits, enlarged bilinearly,
- the model input itself (the channel mean of what the image encoder read: normalised
  by the model's pixel statistics, zero-padded to the square input),

and adds a correction to the logits (its last layer starts at zero, so an untrained head
leaves the decoder's maps as they were). Two 3x3 convolutions on the image, then ``depth``
more on everything, dilated 1, 2, 4, ... and 1: at depth 4 (1, 2, 4, 1) each output
pixel sees 21 pixels across, enough to place an edge between neighbours whose centres the
decoder already found; each further layer doubles the last dilation (depth 5 sees 37).

Its weights live in the instance decoder's state under ``refine.``; a decoder without
such keys is micro-sam's, unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ImageRefiner"]

IMAGE_FEATURES = 8
"""Channels the image is turned into before it meets the decoder's features."""

DEPTH = 4
"""3x3 layers after the image's own two, unless a refiner says otherwise."""


def dilations(depth: int) -> tuple[int, ...]:
    """Dilations of the ``depth`` layers that read everything: 1, 2, 4, ..., then 1."""
    if depth < 2:
        raise ValueError(f"an image refiner has at least 2 layers after the image's, not {depth}")
    return (1, *(2**k for k in range(1, depth - 1)), 1)


def margin(depth: int) -> int:
    """Pixels around a window that a windowed refinement also computes: more than each
    output pixel sees on either side (two convolutions on the image, then
    :func:`dilations`) plus the bilinear enlargement's reach (rounded up to 8), so the
    window's values are those of the whole input. 16 at depth 4 (it sees 10)."""
    reach = 2 + sum(dilations(depth)) + 4
    return -(-reach // 8) * 8


class ImageRefiner(nn.Module):
    """Corrects an instance decoder's logits from the model input's pixels.

    Parameters
    ----------
    features
        Channels of the decoder's last features (its ``initial_features``).
    width
        Channels of the head's hidden layers.
    out_channels
        Maps it corrects (3: foreground, centre distances, boundary distances).
    depth
        3x3 layers on everything (:func:`dilations`); read back from the keys
        (:meth:`depth_of`).
    """

    def __init__(self, features: int, width: int, out_channels: int = 3, depth: int = DEPTH):
        super().__init__()
        self.depth = int(depth)
        self.margin = margin(self.depth)
        body: list[nn.Module] = []
        for k, d in enumerate(dilations(self.depth)):
            body += [nn.Conv2d(width if k else features + out_channels + IMAGE_FEATURES, width, 3, padding=d,
                               dilation=d), nn.ReLU(inplace=True)]
        self.image = nn.Sequential(
            nn.Conv2d(1, IMAGE_FEATURES, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(IMAGE_FEATURES, IMAGE_FEATURES, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.body = nn.Sequential(*body, last := nn.Conv2d(width, out_channels, 1))
        for p in last.parameters():
            nn.init.zeros_(p)

    @staticmethod
    def depth_of(state_dict, prefix: str = "refine.") -> int:
        """The ``depth`` of the refiner whose weights are under ``prefix`` in ``state_dict``:
        its body's 3x3 layers (all but the last, 1x1, convolution)."""
        head = f"{prefix}body."
        return sum(1 for k, v in state_dict.items() if k.startswith(head) and k.endswith(".weight")
                   and v.dim() == 4 and v.shape[-1] == 3)

    def forward(
        self, features: torch.Tensor, logits: torch.Tensor, image: torch.Tensor,
        window: tuple[int, int, int, int] | None = None,
    ) -> torch.Tensor:
        """Refined logits at the image's resolution.

        Parameters
        ----------
        features, logits
            (B, F, h, w) and (B, C, h, w): the decoder's last features and its logits, on a
            grid that the image's side is a whole multiple of.
        image
            (B, 3, H, W) model input (normalised, padded), in the same frame.
        window
            (row0, row1, col0, col1) in image pixels: the part of the maps that will be
            used (a tile's interior). The refiner then works on it and a margin wider than
            what it sees (exact there), and leaves the rest as the decoder's logits,
            enlarged: most of the cost where tiles overlap by wide halos.

        Returns
        -------
        torch.Tensor
            (B, C, H, W) logits (apply a sigmoid for the maps).
        """
        if window is not None:
            factor = image.shape[-1] // logits.shape[-1]
            r0, r1, c0, c1 = (int(v) for v in window)
            # widened by the margin and out to the decoder's grid, so that the crop's edges
            # (where enlarging and convolving see the crop's border) stay outside the window
            r0, c0 = (max(0, (v - self.margin) // factor * factor) for v in (r0, c0))
            r1, c1 = (min(n, -(-(v + self.margin) // factor) * factor) for v, n in ((r1, image.shape[-2]),
                                                                                 (c1, image.shape[-1])))
            full = F.interpolate(logits, tuple(image.shape[-2:]), mode="bilinear", align_corners=False)
            coarse = (..., slice(r0 // factor, r1 // factor), slice(c0 // factor, c1 // factor))
            full[..., r0:r1, c0:c1] = self(features[coarse], logits[coarse], image[..., r0:r1, c0:c1])
            return full
        size = tuple(image.shape[-2:])
        if size != tuple(logits.shape[-2:]):
            features = F.interpolate(features, size, mode="bilinear", align_corners=False)
            logits = F.interpolate(logits, size, mode="bilinear", align_corners=False)
        # Channels-last tensors take oneDNN's faster convolutions on a CPU: half the time here.
        last = torch.channels_last
        grey = image.to(logits.dtype).mean(1, keepdim=True).contiguous(memory_format=last)
        x = torch.cat([features, logits, self.image(grey)], dim=1).contiguous(memory_format=last)
        return logits + self.body(x).contiguous()
