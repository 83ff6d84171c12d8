"""Choosing among a lone click's three masks by looking at them on the image.

A lone click is ambiguous (a nucleus, its bright grain, the cluster it sits in), so SAM
answers it with three masks and its IoU head says which fits best. The head reads only the
decoder's IoU token; on nuclei it mostly takes the first mask, where the best of the three
would score 0.07-0.16 IoU more (docs/default_model.md, "A lone click's mask chosen by
looking"). This head (ours; the official model has nothing like it) looks at the three
masks together on the pixels they were predicted on: a window around them and the click,
resampled to a fixed side so that a nucleus of any size fills it alike, goes through a
small convolutional network that, given the IoU head's own values and the window's size
as well, estimates each mask's IoU with the object.

It is stored with the mask refiner (:mod:`~napari_sam.model.mask_refiner`), under the
``chooser.`` keys of the same ``mask_refiner_state``: both read the model input beside the
prompted masks, and every path that keeps the refiner (fine-tuning, export) keeps it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CHOOSER_PREFIX", "WINDOW", "MaskChooser", "chooser_windows", "mask_chooser_from_state_dict"]

CHOOSER_PREFIX = "chooser."
"""Keys of a mask refiner's state that hold its chooser."""

WINDOW = 48
"""Side, in pixels, of the window the chooser reads (whatever the masks' size)."""

_MARGIN, _PAD, _SMALLEST = 1.3, 8.0, 16.0  # the window: the masks' extent x1.3 + 8 pixels, at least 16
_LOGIT_SCALE = 4.0  # the masks are read as tanh(logit / 4): the outline's neighbourhood, not its far field


def chooser_windows(low: torch.Tensor, image: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows a :class:`MaskChooser` reads, in the model-input frame.

    Parameters
    ----------
    low
        (N, 3, s, s) low-res logits of each lone click's three masks.
    image
        (S, S) the model input the masks were predicted on, its channels averaged
        (normalised by the model's pixel statistics, zero-padded).
    points
        (N, 2) each click as (x, y) in model-input pixels.

    Returns
    -------
    windows, side
        (N, 4, WINDOW, WINDOW): the image standardised within the window, then the three
        masks' logits; (N,) the window's side in model-input pixels. The window is the
        square around the three masks' union and the click, enlarged by a third.
    """
    size = image.shape[-1]
    up = F.interpolate(low.float(), (size, size), mode="bilinear", align_corners=False)
    windows, sides = [], []
    for i in range(low.shape[0]):
        x, y = float(points[i, 0]), float(points[i, 1])
        rows, cols = torch.nonzero((up[i] > 0).any(0), as_tuple=True)
        r0, r1, c0, c1 = y, y, x, x
        if rows.numel():
            r0, r1 = min(float(rows.min()), y), max(float(rows.max()), y)
            c0, c1 = min(float(cols.min()), x), max(float(cols.max()), x)
        side = max(max(r1 - r0, c1 - c0) * _MARGIN + _PAD, _SMALLEST)
        cy, cx = (r0 + r1) / 2, (c0 + c1) / 2
        ys = torch.linspace(cy - side / 2, cy + side / 2, WINDOW)
        xs = torch.linspace(cx - side / 2, cx + side / 2, WINDOW)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([(gx + 0.5) / size * 2 - 1, (gy + 0.5) / size * 2 - 1], -1)[None].to(up)
        stack = torch.cat([image[None].to(up), up[i].clamp(-20, 20)], 0)[None]
        windows.append(F.grid_sample(stack, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0])
        sides.append(side)
    return torch.stack(windows), torch.tensor(sides, dtype=torch.float32, device=up.device)


def _block(inputs: int, outputs: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride, 1), nn.GroupNorm(8, outputs), nn.GELU())


class MaskChooser(nn.Module):
    """Estimates the IoU of each of a lone click's three masks from the image.

    Parameters
    ----------
    width
        Channels of the first layers (twice that in the last).
    """

    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(_block(4, width, 2), _block(width, width, 1), _block(width, 2 * width, 2),
                                  _block(2 * width, 2 * width, 1), _block(2 * width, 2 * width, 2))
        self.head = nn.Sequential(nn.Linear(2 * width + 4, 64), nn.GELU(), nn.Linear(64, 3))

    def forward(self, windows: torch.Tensor, predicted: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """Logits of the estimated IoU of each mask (sigmoid: the IoU), (N, 3).

        ``windows`` as :func:`chooser_windows` gives them (float16 allowed), ``predicted``
        (N, 3) the IoU head's values, ``side`` (N,) the windows' sides."""
        windows = windows.float()
        grey = windows[:, :1]
        mean, spread = grey.mean((2, 3), keepdim=True), grey.std((2, 3), keepdim=True) + 1e-3
        x = torch.cat([(grey - mean) / spread, torch.tanh(windows[:, 1:] / _LOGIT_SCALE)], 1)
        features = self.body(x).mean((2, 3))
        return self.head(torch.cat([features, predicted.float(), torch.log(side.float())[:, None] / 4], 1))

    @torch.inference_mode()
    def estimate(self, low: torch.Tensor, image: torch.Tensor, points: torch.Tensor,
                 predicted: torch.Tensor) -> torch.Tensor:
        """Estimated IoU of each of N lone clicks' three masks, (N, 3) in [0, 1].

        Parameters
        ----------
        low
            (N, 3, s, s) the masks' low-res logits.
        image
            (1, 3, S, S) the model input they were predicted on.
        points
            (N, 2) the clicks as (x, y) in model-input pixels.
        predicted
            (N, 3) the IoU head's values.
        """
        windows, side = chooser_windows(low, image[0].float().mean(0), points)
        return torch.sigmoid(self(windows, predicted.to(windows), side))


def mask_chooser_from_state_dict(state: Mapping[str, torch.Tensor]) -> MaskChooser:
    """A :class:`MaskChooser` with exactly the weights of ``state`` (keys without the
    :data:`CHOOSER_PREFIX`; its width read from the first layer).

    Raises
    ------
    ValueError
        For a state that does not fit.
    """
    first = state.get("body.0.0.weight")
    if first is None or first.dim() != 4 or first.shape[1] != 4:
        found = None if first is None else tuple(first.shape)
        raise ValueError(f"not a mask chooser's state: body.0.0.weight is {found}, expected (width, 4, 3, 3)")
    chooser = MaskChooser(int(first.shape[0]))
    try:
        chooser.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as error:
        raise ValueError(f"mask chooser state does not fit: {error}") from None
    return chooser.eval()
