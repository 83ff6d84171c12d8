"""Small building blocks shared by the encoders and the mask decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .matmul import activation_of, linear


class MLPBlock(nn.Module):
    """Two linear layers with a GELU between them (keys ``lin1``, ``lin2``)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()
        # Exact GELU and ReLU are applied inside the first product (see matmul.linear).
        self._fused = activation_of(self.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is None:
            h = self.act(self.lin1(x))
        else:
            h = linear(x, self.lin1.weight, self.lin1.bias, self._fused)
        return linear(h, self.lin2.weight, self.lin2.bias)


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of every pixel of a (B, C, H, W) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # layer_norm on a channels-last view: one fused kernel instead of the
        # mean/var/sqrt chain, same arithmetic.
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


def neck(in_dim: int, out_chans: int) -> nn.Sequential:
    """SAM's encoder neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (keys ``neck.0`` to
    ``neck.3``), shared by the ViT and TinyViT encoders."""
    return nn.Sequential(
        nn.Conv2d(in_dim, out_chans, kernel_size=1, bias=False),
        LayerNorm2d(out_chans),
        nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_chans),
    )
