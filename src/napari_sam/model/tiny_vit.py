"""MobileSAM's TinyViT image encoder (``vit_t``).

The encoder of MobileSAM is TinyViT-5M with SAM's neck in place of the ImageNet head:

* a convolutional stem, two stride-2 3x3 convolutions (1024 -> 256 pixels);
* stage 0, MBConv blocks (inverted residuals) at 256x256, then a PatchMerging to 128x128;
* attention stages of TinyViT blocks (window attention with learned offset biases, a
  depthwise 3x3 convolution, an MLP), joined by PatchMerging;
* SAM's neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) to 256 channels at 64x64.

Submodule names and parameter shapes are those of the official checkpoints, so that a
MobileSAM state dict loads with ``strict=True``; the computation is ours and is laid out
for inference speed on CPUs: activations stay channels-last from the stem to the neck
(convolutions see them as channels-last NCHW views, attention and MLPs as token rows),
batch norms are folded into their convolutions in eval mode, attention goes through
:func:`torch.nn.functional.scaled_dot_product_attention`, and stage 0, whose activations
are the largest, runs in bands of rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import neck
from .config import TinyViTConfig
from .matmul import activate, linear

__all__ = ["TinyViT"]

# MobileSAM keeps the 64x64 grid for the last stage (SAM's decoder expects a 64x64 embedding
# from a 1024 input): its PatchMerging uses stride 1 whenever it merges into one of these
# widths, the last-stage widths of TinyViT-5M, -11M and -21M. Checkpoints are only valid
# with this exact rule, so it is reproduced rather than generalised.
_STRIDE_ONE_WIDTHS = frozenset({320, 448, 576})

# Rows of a stage-0 band. Stage 0 expands 64 channels to 256 at 256x256 pixels: a whole
# hidden activation is 64 MiB, which the allocator maps and faults in afresh on every
# call, and which does not fit in cache. 32 rows keep each hidden tensor at 8 MiB.
_BAND_ROWS = 32


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of a freshly computed tensor, in place where autograd allows."""
    return activate(x, "gelu")


def _nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W) view in the channels-last memory format, no copy."""
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_nchw`; contiguous when the convolution kept channels-last."""
    return x.permute(0, 2, 3, 1)


class Conv2dBN(nn.Module):
    """Bias-free Conv2d followed by BatchNorm2d (checkpoint keys ``c`` and ``bn``).

    In eval mode the batch norm is folded into the convolution's weight and bias, which
    saves a full pass over the output; the folded weights are recomputed on every call
    (they are tiny) so that loading a state dict never leaves them stale.
    """

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.c = nn.Conv2d(
            in_chans, out_chans, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_chans)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.bn
        running_mean, running_var = bn.running_mean, bn.running_var
        if running_mean is None or running_var is None:
            raise RuntimeError("folding a batch norm needs its running statistics (track_running_stats=True)")
        scale = bn.weight * torch.rsqrt(running_var + bn.eps)
        return self.c.weight * scale.view(-1, 1, 1, 1), bn.bias - running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in and out, in whichever memory format ``x`` has."""
        if self.training:
            return self.bn(self.c(x))
        weight, bias = self.fused()
        c = self.c
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)

    def nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """Same on a channels-last (B, H, W, C) tensor."""
        return _nhwc(self(_nchw(x)))


class PatchEmbed(nn.Module):
    """Stem: 3x3 stride-2 Conv2dBN, GELU, 3x3 stride-2 Conv2dBN (keys ``seq.0``, ``seq.2``)."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, 3, 2),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, 3, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) NCHW image -> (B, H/4, W/4, C) channels-last features."""
        x = x.contiguous(memory_format=torch.channels_last)
        # GELU on the contiguous (B, H, W, C) view: ATen's elementwise kernels are about
        # twice as slow on the same memory seen as a channels-last NCHW tensor.
        x = _gelu(_nhwc(self.seq[0](x)))
        return _nhwc(self.seq[2](_nchw(x)))


class MBConv(nn.Module):
    """Inverted residual block of stage 0: 1x1 expansion, depthwise 3x3, 1x1 projection,
    residual, GELU (keys ``conv1``, ``conv2``, ``conv3``)."""

    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim)
        self.act = nn.GELU()

    def _rows(self, x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Output rows ``r0:r1`` of the block for a (B, H, W, C) input."""
        H = x.shape[1]
        # One row of halo on each side for the 3x3 depthwise convolution. Its own zero
        # padding then stands in for the halo only at the image border, where the full
        # computation pads with zeros too; other halo rows' outputs are cropped.
        a, b = max(r0 - 1, 0), min(r1 + 1, H)
        h = _gelu(self.conv1.nhwc(x[:, a:b]))
        h = _gelu(self.conv2.nhwc(h)[:, r0 - a : r1 - a])
        return _gelu(self.conv3.nhwc(h) + x[:, r0:r1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) channels-last in and out."""
        H = x.shape[1]
        if H <= _BAND_ROWS or x.requires_grad:
            return self._rows(x, 0, H)
        out = torch.empty_like(x)
        for r0 in range(0, H, _BAND_ROWS):
            r1 = min(r0 + _BAND_ROWS, H)
            out[:, r0:r1] = self._rows(x, r0, r1)
        return out


class PatchMerging(nn.Module):
    """Between stages: 1x1 conv, GELU, depthwise 3x3 conv (stride 2, or 1 into the last
    stage, see ``_STRIDE_ONE_WIDTHS``), GELU, 1x1 conv."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        stride = 1 if out_dim in _STRIDE_ONE_WIDTHS else 2
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) channels-last in and out."""
        x = _gelu(self.conv1.nhwc(x))
        x = _gelu(self.conv2.nhwc(x))
        return self.conv3.nhwc(x)


class Mlp(nn.Module):
    """LayerNorm, Linear, GELU, Linear (keys ``norm``, ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = linear(self.norm(x), self.fc1.weight, self.fc1.bias, "gelu")
        return linear(h, self.fc2.weight, self.fc2.bias)


class Attention(nn.Module):
    """Multi-head self-attention within one window, with a learned bias per head and per
    offset (|dy|, |dx|) between query and key.

    Parameters are those of the checkpoints: ``norm`` (pre-norm), ``qkv`` (whose output
    holds, per head, that head's query, key and value in turn: not the q | k | v blocks of
    SAM's ViT), ``proj`` and ``attention_biases`` (heads, window**2). The (N, N) table of
    offset indices into the biases, ``attention_bias_idxs``, is a non-persistent buffer:
    the checkpoints do not hold it.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        self.register_buffer("attention_bias_idxs", self._bias_index(window_size), persistent=False)

    @staticmethod
    def _bias_index(window_size: int, device: torch.device | None = None) -> torch.Tensor:
        # The official code numbers the distinct offsets in the order they first appear
        # while scanning (query, key) pairs in raster order. The first query, (0, 0), meets
        # every offset, in raster order, before any other query is scanned, so that number
        # is simply |dy| * window_size + |dx|.
        r = torch.arange(window_size, device=device)
        y = r.repeat_interleave(window_size)
        x = r.repeat(window_size)
        return (y[:, None] - y[None, :]).abs() * window_size + (x[:, None] - x[None, :]).abs()

    def init_non_persistent_buffers(self) -> None:
        """Rebuild the offset index table (not in checkpoints) where the parameters live;
        needed after building on the meta device and loading with ``assign=True``."""
        self.attention_bias_idxs = self._bias_index(self.window_size, self.attention_biases.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(windows, N, C) tokens in and out, N = window_size**2."""
        Bw, N, C = x.shape
        qkv = linear(self.norm(x), self.qkv.weight, self.qkv.bias).view(Bw, N, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)
        # (1, heads, N, N), broadcast over windows: a 4-D mask is what lets PyTorch pick its
        # fused CPU kernel; with a 3-D one it falls back to the unfused math path.
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype).unsqueeze(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return linear(out.transpose(1, 2).reshape(Bw, N, C), self.proj.weight, self.proj.bias)


class TinyViTBlock(nn.Module):
    """Window attention (residual), depthwise 3x3 Conv2dBN (``local_conv``, no residual),
    MLP (residual)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float):
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, 3, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) channels-last in and out."""
        B, H, W, C = x.shape
        ws = self.window_size
        pad_h, pad_w = -H % ws, -W % ws
        # The official block pads with zeros *before* the attention's LayerNorm, so padded
        # tokens enter attention as keys and values (the norm's bias, projected) and change
        # the result near the bottom/right edges: pad first, as it does.
        y = F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x
        nh, nw = (H + pad_h) // ws, (W + pad_w) // ws
        y = y.view(B, nh, ws, nw, ws, C).transpose(2, 3).reshape(B * nh * nw, ws * ws, C)
        y = self.attn(y)
        y = y.view(B, nh, nw, ws, ws, C).transpose(2, 3).reshape(B, nh * ws, nw * ws, C)
        x = x + y[:, :H, :W]
        x = self.local_conv.nhwc(x)
        return x + self.mlp(x)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks, then PatchMerging into the next stage's width."""

    def __init__(self, dim: int, depth: int, out_dim: int, expand_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class BasicLayer(nn.Module):
    """An attention stage: TinyViT blocks, then PatchMerging unless it is the last stage."""

    def __init__(
        self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float, out_dim: int | None
    ):
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, num_heads, window_size, mlp_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim) if out_dim is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """MobileSAM's image encoder: TinyViT with SAM's neck.

    Parameters
    ----------
    config : TinyViTConfig
        Stage widths, depths, heads and window sizes; the default is MobileSAM's
        ``vit_t`` (TinyViT-5M).

    Attributes
    ----------
    patch_embed : PatchEmbed
        Convolutional stem, input pixels to a quarter of the resolution.
    layers : torch.nn.ModuleList
        Stage 0 (MBConv) and the attention stages.
    norm_head, head : torch.nn.Module
        TinyViT's ImageNet classifier. The official checkpoints hold it, so it is kept
        for strict loading, but it is never computed.
    neck : torch.nn.Sequential
        SAM's neck to ``config.out_chans`` channels.

    Notes
    -----
    The state dict has exactly the keys and shapes of the ``image_encoder.`` part of a
    MobileSAM checkpoint. The attention offset tables are non-persistent buffers; after
    building on the meta device and loading with ``assign=True``, call
    :meth:`init_non_persistent_buffers`.

    In eval mode under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the matrix products
    and convolutions run in bfloat16 while the residual stream stays float32.

    Examples
    --------
    >>> encoder = TinyViT(TinyViTConfig()).eval()
    >>> with torch.inference_mode():
    ...     embedding = encoder(torch.zeros(1, 3, 1024, 1024))
    >>> tuple(embedding.shape)
    (1, 256, 64, 64)
    """

    def __init__(self, config: TinyViTConfig):
        super().__init__()
        self.config = config
        dims = config.embed_dims
        n = len(dims)
        if not (len(config.depths) == len(config.num_heads) == len(config.window_sizes) == n) or n < 2:
            raise ValueError(f"inconsistent or too few stages in {config}")
        self.patch_embed = PatchEmbed(3, dims[0])
        layers: list[nn.Module] = [ConvLayer(dims[0], config.depths[0], dims[1], expand_ratio=4.0)]
        for i in range(1, n):
            layers.append(
                BasicLayer(
                    dims[i],
                    config.depths[i],
                    config.num_heads[i],
                    config.window_sizes[i],
                    config.mlp_ratio,
                    dims[i + 1] if i + 1 < n else None,
                )
            )
        self.layers = nn.ModuleList(layers)
        self.norm_head = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], 1000)
        self.neck = neck(dims[-1], config.out_chans)

    def init_non_persistent_buffers(self) -> None:
        """Rebuild every buffer that checkpoints do not hold, on the parameters' device."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.init_non_persistent_buffers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch of images.

        Parameters
        ----------
        x : torch.Tensor
            (B, 3, 1024, 1024) float, normalised with SAM's pixel mean and std and
            zero-padded at the bottom and right.

        Returns
        -------
        torch.Tensor
            (B, out_chans, 64, 64) image embedding, contiguous.
        """
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(_nchw(x)).contiguous()
