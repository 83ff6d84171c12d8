"""The Hiera trunk of SAM 2's image encoder (hierarchical vision transformer).

A 7x7 stride-4 convolution makes tokens; stages of blocks follow, each stage after the
first starting with a block that max-pools its queries 2x2, halving the grid, while
width and heads grow. Most blocks attend within square windows, a few globally. The
position embedding is a bicubically resized background grid plus a tiled per-window
embedding. Parameter names are the official ones (``patch_embed.proj``, ``pos_embed``,
``pos_embed_window``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.layers.{0,1},proj}``).

The arithmetic is the official model's; the data movement is leaner, which is where a
CPU spends much of a Hiera forward besides the products. Tokens stay channels-last
(B, H, W, C) and contiguous throughout (the official stream starts as a permuted view of
the convolution output, which its layer norms copy); windows are cut by one
reshape/permute of the normalised tokens (a third of the channels of ``qkv``, which the
official code partitions), partial windows zero-padded as officially; the strided query
slice is max-pooled as the maximum of its strided views, without a copy; the attention
output returns from (windows, heads, tokens, head_dim) to the token grid in one permute;
the position embedding is kept between calls while its parameters are unchanged;
residual additions and GELU run in place when no gradient is recorded; linear layers go
through :func:`napari_sam.model.matmul.linear` (oneDNN with the GELU fused, where the
runtime turns that route on).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..matmul import linear
from .config import HieraConfig


def pool_2x2(x: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """Max-pool a channels-last (B, H, W, C) grid by ``stride`` with floor division, as
    ``nn.MaxPool2d(stride, stride)``: (B, H // sh, W // sw, C).

    A contiguous grid goes through the channels-last pooling kernel (one pass); a strided
    one, such as the query slice of ``qkv``, as the maximum of its ``sh * sw`` strided
    views, which reads it as it lies instead of copying it first.
    """
    sh, sw = stride
    if x.is_contiguous():
        return F.max_pool2d(x.permute(0, 3, 1, 2), (sh, sw), (sh, sw)).permute(0, 2, 3, 1)
    B, H, W, C = x.shape
    h, w = H // sh, W // sw
    v = x[:, : h * sh, : w * sw].reshape(B, h, sh, w, sw, C)
    out = v[:, :, 0, :, 0]
    for i in range(sh):
        for j in range(sw):
            if i or j:
                out = torch.maximum(out, v[:, :, i, :, j])
    return out


class MultiScaleAttention(nn.Module):
    """Attention whose queries may be pooled (stage transitions): keys ``qkv``, ``proj``;
    computed by :class:`MultiScaleBlock`."""

    def __init__(self, dim: int, dim_out: int, num_heads: int):
        super().__init__()
        if dim_out % num_heads:
            raise ValueError(f"{dim_out} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.dim_out = dim_out
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)


class HieraMLP(nn.Module):
    """Linear, exact GELU, linear (keys ``layers.0``, ``layers.1`` as the official MLP)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = (cast(nn.Linear, layer) for layer in self.layers)
        # GELU inside the first product where the oneDNN route is on (matmul.linear)
        return linear(linear(x, first.weight, first.bias, "gelu"), second.weight, second.bias)


class MultiScaleBlock(nn.Module):
    """Pre-norm block: (windowed) attention with optional query pooling, then an MLP.

    Parameters
    ----------
    dim, dim_out
        Input and output width; a linear ``proj`` (and pooling) maps the shortcut when
        they differ.
    num_heads
        Attention heads.
    q_stride
        Query pooling stride, or None.
    window_size
        Side of the attention windows; 0 attends over the whole grid.
    mlp_ratio
        Hidden width of the MLP relative to ``dim_out``.
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_stride: tuple[int, int] | None,
                 window_size: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size
        self.q_stride = tuple(q_stride) if q_stride else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        hidden = int(dim_out * mlp_ratio)
        self.mlp = HieraMLP(dim_out, hidden)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, dim) channels-last tokens to (B, H', W', dim_out)."""
        xn = F.layer_norm(x, (self.dim,), self.norm1.weight, self.norm1.bias, self.norm1.eps)
        shortcut = x
        if self.dim != self.dim_out:
            shortcut = linear(xn, self.proj.weight, self.proj.bias)
            if self.q_stride:
                shortcut = pool_2x2(shortcut, self.q_stride)
        out = self._attention(xn, shortcut.shape[1], shortcut.shape[2])
        x = shortcut + out
        h = self.mlp(F.layer_norm(x, (self.dim_out,), self.norm2.weight, self.norm2.bias, self.norm2.eps))
        # x is this block's own tensor: without autograd the residual goes in place
        return x + h if torch.is_grad_enabled() else x.add_(h)

    def _attention(self, xn: torch.Tensor, H_out: int, W_out: int) -> torch.Tensor:
        """Attention output (B, H_out, W_out, dim_out), projected, for normalised tokens
        (a strided view where partial windows were cropped away)."""
        attn = self.attn
        B, H, W, _ = xn.shape
        D, heads = self.dim_out, attn.num_heads
        d = D // heads
        ws = self.window_size
        if ws > 0:
            nh, nw = -(-H // ws), -(-W // ws)
            if (nh * ws, nw * ws) != (H, W):
                # partial windows are padded with zero tokens, as officially; padding the
                # normalised tokens moves a third of the data that padding qkv would
                xn = F.pad(xn, (0, 0, 0, nw * ws - W, 0, nh * ws - H))
            # windows (B * nh * nw, ws, ws, C) cut from the normalised tokens, not from qkv
            xw = xn.view(B, nh, ws, nw, ws, -1).transpose(2, 3).reshape(-1, ws, ws, xn.shape[-1])
            qkv = linear(xw, attn.qkv.weight, attn.qkv.bias)
            wh = ww = ws
        else:
            qkv = linear(xn, attn.qkv.weight, attn.qkv.bias)  # (B, H, W, 3D)
            nh = nw = 1
            wh, ww = H, W
        n_win = qkv.shape[0]
        q = qkv[..., :D]
        if self.q_stride:
            q = pool_2x2(q, self.q_stride)
        qh, qw = q.shape[1], q.shape[2]
        q = q.reshape(n_win, qh * qw, heads, d).transpose(1, 2)
        kv = qkv.view(n_win, wh * ww, 3, heads, d)
        k = kv[:, :, 1].transpose(1, 2)
        v = kv[:, :, 2].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (n_win, heads, qh * qw, d)
        # back to the grid in one permute: (B, nh, qh, nw, qw, heads, d)
        out = out.view(B, nh, nw, heads, qh, qw, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, nh * qh, nw * qw, D)
        # projected with the padding, as officially: cropping first would cost a copy and
        # the slower product of a strided input
        out = linear(out, attn.proj.weight, attn.proj.bias)
        return out[:, :H_out, :W_out] if out.shape[1:3] != (H_out, W_out) else out


class PatchEmbed(nn.Module):
    """7x7 stride-4 convolution to channels-last tokens (key ``proj``)."""

    def __init__(self, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) to contiguous channels-last tokens (B, H/4, W/4, C)."""
        # a channels-last input makes the convolution run channels-last (about twice as
        # fast on a CPU) and write the token layout directly
        return self.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)


class Hiera(nn.Module):
    """Hiera trunk.

    Parameters
    ----------
    config
        Stages, widths, heads and windows; see :class:`~napari_sam.model.sam2.config.HieraConfig`.

    Notes
    -----
    ``forward`` takes a normalised batch (B, 3, S, S) and returns the output of every
    stage (or of the last only, without ``return_interm_layers``), highest resolution
    first, as (B, C_i, S / 4 / 2^i, S / 4 / 2^i) channels-last views.
    """

    def __init__(self, config: HieraConfig):
        super().__init__()
        c = config
        self.config = config
        self.patch_embed = PatchEmbed(c.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.embed_dim, *c.window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, c.embed_dim, c.window_spec[0], c.window_spec[0]))
        stage_ends = c.stage_ends
        q_pool_blocks = [e + 1 for e in stage_ends[:-1]][: c.q_pool]
        dim, heads, stage = c.embed_dim, c.num_heads, 0
        blocks = []
        for i in range(sum(c.stages)):
            dim_out = dim
            # the first block of a stage still uses the previous stage's window size
            window = 0 if i in c.global_att_blocks else c.window_spec[stage]
            if i - 1 in stage_ends:
                dim_out = int(dim * c.dim_mul)
                heads = int(heads * c.head_mul)
                stage += 1
            blocks.append(MultiScaleBlock(dim, dim_out, heads, c.q_stride if i in q_pool_blocks else None, window))
            dim = dim_out
        self.blocks = nn.ModuleList(blocks)
        self._outputs = set(stage_ends if c.return_interm_layers else stage_ends[-1:])
        self.channel_list = list(c.channel_list)
        self._pos_cache: tuple[tuple, torch.Tensor] | None = None

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """Position embedding of an (h, w) token grid, channels-last (1, h, w, C).

        Without autograd the result is kept for the next call while the two parameters
        stay the same objects, unmodified (their version counters), on the same grid.
        """
        key = (h, w, id(self.pos_embed), self.pos_embed._version, id(self.pos_embed_window),
               self.pos_embed_window._version, self.pos_embed.device, self.pos_embed.dtype)
        cached = self._pos_cache
        if cached is not None and cached[0] == key and not torch.is_grad_enabled():
            return cached[1]
        pos = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic")
        win = self.pos_embed_window
        reps = (h // win.shape[-2], w // win.shape[-1])
        # the window embedding tiled over whole windows (the official tiling needs h, w to
        # be multiples of the window too)
        pos = pos.view(1, -1, reps[0], win.shape[-2], reps[1], win.shape[-1]) + win[:, :, None, :, None, :]
        pos = pos.view(1, -1, h, w).permute(0, 2, 3, 1).contiguous()
        if not torch.is_grad_enabled():
            self._pos_cache = (key, pos)
        return pos

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        pos = self.pos_embed_for(x.shape[1], x.shape[2])
        # channels-last and contiguous from here on: every step reads whole tokens
        x = (x + pos).contiguous() if torch.is_grad_enabled() else x.contiguous().add_(pos)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self._outputs:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs
