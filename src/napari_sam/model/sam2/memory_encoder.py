"""SAM 2's memory encoder: a frame's features fused with its predicted mask into a memory.

The mask (model input resolution, as mask probabilities already scaled by the caller)
is downsampled by strided convolutions to the feature grid (:class:`MaskDownSampler`),
added to a 1x1 projection of the frame's features, mixed by ConvNeXt blocks
(:class:`Fuser` of :class:`CXBlock`) and projected to the memory width (64 in SAM 2.1).
The frame's projection does not depend on the object, so a frame's several objects
share it (features with batch 1, masks with one batch entry per object).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..common import LayerNorm2d
from ..matmul import linear

__all__ = ["CXBlock", "Fuser", "MaskDownSampler", "MemoryEncoder"]


class MaskDownSampler(nn.Module):
    """Strided convolutions, each followed by LayerNorm2d and GELU, from one channel to
    ``embed_dim`` channels, ``total_stride`` times smaller (keys ``encoder.N``).

    Every step divides the size by ``stride`` and multiplies the channels by ``stride**2``;
    a final 1x1 convolution maps them to ``embed_dim``.
    """

    def __init__(self, embed_dim: int = 256, kernel_size: int = 4, stride: int = 4, padding: int = 0,
                 total_stride: int = 16):
        super().__init__()
        num_layers = int(math.log2(total_stride) // math.log2(stride))
        if stride**num_layers != total_stride:
            raise ValueError(f"total_stride {total_stride} is not a power of stride {stride}")
        layers: list[nn.Module] = []
        chans = 1
        for _ in range(num_layers):
            out = chans * stride**2
            layers += [nn.Conv2d(chans, out, kernel_size, stride, padding), LayerNorm2d(out), nn.GELU()]
            chans = out
        layers.append(nn.Conv2d(chans, embed_dim, kernel_size=1))
        self.encoder = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) mask -> (B, embed_dim, H / total_stride, W / total_stride)."""
        return self.encoder(x)


class CXBlock(nn.Module):
    """ConvNeXt block: depthwise convolution, LayerNorm2d, pointwise MLP (as linear layers
    over channels-last pixels), layer scale ``gamma``, residual.

    ``drop_path`` is kept for the official signature and never applied (inference only).
    """

    def __init__(self, dim: int, kernel_size: int = 7, padding: int = 3, drop_path: float = 0.0,
                 layer_scale_init_value: float = 1e-6, use_dwconv: bool = True):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=kernel_size, padding=padding, groups=dim if use_dwconv else 1)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (
            nn.Parameter(torch.full((dim,), float(layer_scale_init_value))) if layer_scale_init_value > 0 else None
        )
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = F.layer_norm(y, (y.shape[-1],), self.norm.weight, self.norm.bias, self.norm.eps)
        y = linear(y, self.pwconv1.weight, self.pwconv1.bias, "gelu")
        y = linear(y, self.pwconv2.weight, self.pwconv2.bias)
        if self.gamma is not None:
            y = y.mul_(self.gamma)
        return x + y.permute(0, 3, 1, 2)


class Fuser(nn.Module):
    """An optional 1x1 input projection (``proj``) and ``num_layers`` copies of ``layer``."""

    def __init__(self, layer: nn.Module, num_layers: int, dim: int | None = None, input_projection: bool = False):
        super().__init__()
        self.proj: nn.Module = nn.Identity()
        if input_projection:
            if dim is None:
                raise ValueError("a fuser with input_projection needs dim")
            self.proj = nn.Conv2d(dim, dim, kernel_size=1)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """Frame features and a mask -> memory features and their positional encoding.

    Parameters
    ----------
    out_dim
        Memory width; a 1x1 ``out_proj`` maps to it when it differs from ``in_dim``.
    mask_downsampler, fuser
        The modules above.
    position_encoding
        Module giving the (B, out_dim, h, w) positional encoding of a (B, out_dim, h, w)
        map (the sine encoding; it has no parameters).
    in_dim
        Width of the frame features (256).
    """

    def __init__(self, out_dim: int, mask_downsampler: nn.Module, fuser: nn.Module, position_encoding: nn.Module,
                 in_dim: int = 256):
        super().__init__()
        self.mask_downsampler = mask_downsampler
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = fuser
        self.position_encoding = position_encoding
        self.out_proj: nn.Module = nn.Identity()
        if out_dim != in_dim:
            self.out_proj = nn.Conv2d(in_dim, out_dim, kernel_size=1)

    def forward(self, pix_feat: torch.Tensor, masks: torch.Tensor,
                skip_mask_sigmoid: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a memory.

        Parameters
        ----------
        pix_feat
            (1 or B, in_dim, h, w) frame features; batch 1 serves all B masks.
        masks
            (B, 1, H, W) mask logits at the model's input resolution (H = h * total stride),
            or already mapped to probabilities with ``skip_mask_sigmoid``.

        Returns
        -------
        features : (B, out_dim, h, w)
        pos : (B, out_dim, h, w) positional encoding (a broadcast view: read-only)
        """
        if not skip_mask_sigmoid:
            masks = torch.sigmoid(masks)
        masks = self.mask_downsampler(masks)
        x = self.pix_feat_proj(pix_feat.to(masks.device)) + masks
        x = self.out_proj(self.fuser(x))
        pos = self.position_encoding(x).to(x.dtype)
        return x, pos
