"""MobileSAM's TinyViT-5M image encoder (``vit_t``).

A convolutional stem (two stride-2 3x3 convs: 1024 -> 256), a stage of MBConv blocks,
then three stages of windowed self-attention blocks, each followed by a depthwise 3x3
convolution and an MLP. Stages are joined by PatchMerging, which halves the resolution
except before the last stage, whose width (320) MobileSAM keeps at 64x64 so that the
output grid matches SAM's decoder. The SAM neck then maps 320 channels to 256.

Attention biases are learned per head and per (|dy|, |dx|) offset inside a window, looked
up through a fixed index table that is rebuilt at load time (it is not in checkpoints).
The checkpoints also hold an unused ImageNet head (``norm_head``, ``head``); it is kept so
that they load strictly, and never computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import neck
from .config import TinyViTConfig

# MobileSAM keeps the resolution when merging into these widths (the last stage).
_STRIDE_ONE_WIDTHS = (320, 448, 576)


class Conv2dBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d (keys ``c`` and ``bn``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, pad: int = 0, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class PatchEmbed(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(cin, dim // 2, 3, 2, 1), nn.GELU(), Conv2dBN(dim // 2, dim, 3, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU."""

    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x))
        y = self.act(self.conv2(y))
        return self.act(x + self.conv3(y))


class PatchMerging(nn.Module):
    """1x1 conv, depthwise 3x3 (stride 2, or 1 into the last stage), 1x1 conv; works on
    (B, C, H, W) images and returns the same layout."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        stride = 1 if out_dim in _STRIDE_ONE_WIDTHS else 2
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.conv3(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Window attention with a learned bias per head and per in-window offset (|dy|, |dx|)."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.window = window
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("attention_bias_idxs", self._offset_index(window), persistent=False)

    @staticmethod
    def _offset_index(window: int, device=None) -> torch.Tensor:
        # Offsets are numbered in the order they first occur scanning (query, key) pairs
        # row-major; with |dy|, |dx| that order is simply |dy| * window + |dx|.
        r = torch.arange(window, device=device)
        yy, xx = torch.meshgrid(r, r, indexing="ij")
        y, x = yy.flatten(), xx.flatten()
        return (y[:, None] - y[None, :]).abs() * window + (x[:, None] - x[None, :]).abs()

    def init_non_persistent_buffers(self) -> None:
        """Rebuild the index table (not stored in checkpoints) on the parameters' device."""
        self.attention_bias_idxs = self._offset_index(self.window, self.attention_biases.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(self.norm(x))
        # per head the projection holds [q | k | v] (MobileSAM's layout, unlike the ViT's)
        q, k, v = qkv.view(B, N, self.num_heads, 3 * self.key_dim).transpose(1, 2).split(self.key_dim, dim=-1)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.key_dim**-0.5)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class TinyViTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float):
        super().__init__()
        self.window = window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) channels last; returns the same."""
        B, H, W, C = x.shape
        ws = self.window
        pad_b, pad_r = (-H) % ws, (-W) % ws
        y = F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) if pad_b or pad_r else x
        Hp, Wp = H + pad_b, W + pad_r
        y = y.view(B, Hp // ws, ws, Wp // ws, ws, C).transpose(2, 3).reshape(-1, ws * ws, C)
        y = self.attn(y)
        y = y.view(B, Hp // ws, Wp // ws, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        x = x + y[:, :H, :W]
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvLayer(nn.Module):
    def __init__(self, dim: int, depth: int, out_dim: int, expand_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x)


class BasicLayer(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float, out_dim: int | None):
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, num_heads, window, mlp_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim) if out_dim is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in and out; the blocks work channels last."""
        x = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = blk(x)
        x = x.permute(0, 3, 1, 2)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """MobileSAM's image encoder.

    Parameters
    ----------
    config
        Stage widths, depths, heads and window sizes; see
        :class:`~napari_sam.model.config.TinyViTConfig`.

    Notes
    -----
    ``forward`` takes a normalised, zero-padded batch (B, 3, 1024, 1024) and returns the
    image embedding (B, 256, 64, 64).
    """

    def __init__(self, config: TinyViTConfig):
        super().__init__()
        self.config = c = config
        dims = c.embed_dims
        self.patch_embed = PatchEmbed(3, dims[0])
        layers: list[nn.Module] = [ConvLayer(dims[0], c.depths[0], dims[1], expand_ratio=4.0)]
        for i in range(1, len(dims)):
            out_dim = dims[i + 1] if i + 1 < len(dims) else None
            layers.append(BasicLayer(dims[i], c.depths[i], c.num_heads[i], c.window_sizes[i], c.mlp_ratio, out_dim))
        self.layers = nn.ModuleList(layers)
        # ImageNet classification head of the checkpoints: loaded, never used.
        self.norm_head = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], 1000)
        self.neck = neck(dims[-1], c.out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)
