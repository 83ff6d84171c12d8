"""The ViT image encoder of the SAM paper (``vit_b``, ``vit_l``, ``vit_h``).

16x16 patches, an absolute position embedding, transformer blocks that attend within
14x14 windows except a few global blocks, decomposed relative position biases, and a
neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) down to 256 channels.

Module and parameter names follow the official checkpoints so that their state dicts load
unchanged. The attention itself is computed differently from the official code, which
materialises the 4096x4096 scores of all heads of a global block at once and adds two
broadcast bias tensors to them in separate passes: most of its time on a CPU. Here, on a
CPU, the scores of one global head at a time are computed with the bias added inside the
product (``baddbmm``); elsewhere, and when autograd records, the bias is handed to
``scaled_dot_product_attention`` as an additive mask, a few heads at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock, neck
from .config import ViTConfig
from .matmul import linear

# Global blocks build an additive bias of (heads, N, N) floats; heads are processed in
# groups so that one group's bias stays below this many elements (256 MiB of float32).
_MAX_BIAS_ELEMENTS = 64 * 1024 * 1024
# On a CPU the scores are computed apart (see Attention._attend_by_products): one global
# head at a time (16M scores) measured fastest, also against query chunks of 8-32 grid
# rows; the windows of all heads fit at once.
_MAX_SCORE_ELEMENTS = 16 * 1024 * 1024


class ImageEncoderViT(nn.Module):
    """ViT backbone with windowed and global attention and a convolutional neck.

    Parameters
    ----------
    config
        Width, depth, heads and global blocks; see :class:`~napari_sam.model.config.ViTConfig`.

    Notes
    -----
    ``forward`` takes a normalised, zero-padded batch (B, 3, 1024, 1024) and returns the
    image embedding (B, 256, 64, 64).
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        c = config
        grid = c.img_size // c.patch_size
        self.patch_embed = PatchEmbed(c.patch_size, 3, c.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, c.embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=c.embed_dim,
                num_heads=c.num_heads,
                mlp_ratio=c.mlp_ratio,
                window_size=0 if i in c.global_attn_indexes else c.window_size,
                input_size=(grid, grid),
            )
            for i in range(c.depth)
        )
        self.neck = neck(c.embed_dim, c.out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # B, H, W, C (channels last throughout the blocks)
        # With reduced-precision weights the residual stream stays float32: rounding it
        # to bfloat16 after every block is what costs most accuracy, and keeping it costs
        # little (the products still run in the weights' precision; see Block).
        stream = torch.promote_types(x.dtype, torch.float32)
        x = x.to(stream) + self.pos_embed.to(stream)
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2).to(self.pos_embed.dtype))


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens, returned channels-last (B, H, W, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block; window_size 0 means global attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, input_size):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            input_size=input_size if window_size == 0 else (window_size, window_size),
            window_size=window_size,
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(_normalise(self.norm1, x))
        return x + self.mlp(_normalise(self.norm2, x))


def _normalise(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` in float32, returned in the precision of the norm's weights."""
    if norm.weight.dtype == x.dtype:
        return norm(x)
    w, b = norm.weight.float(), norm.bias.float()
    return F.layer_norm(x, norm.normalized_shape, w, b, norm.eps).to(norm.weight.dtype)


class Attention(nn.Module):
    """Multi-head attention with decomposed relative position biases (MViTv2 style).

    The bias for query at (qh, qw) and key at (kh, kw) is ``q . Rh[qh - kh] + q . Rw[qw - kw]``
    with ``q`` unscaled, added to the scaled dot product before the softmax.

    With ``window_size > 0`` the (B, H, W, C) grid is zero-padded to whole windows and
    each window attends within itself, as in the official model. The padding tokens are
    zeros, so their projections are just the qkv bias: the projections are computed on
    the real tokens only and the padding filled with the bias, and the output projection
    runs after the padding is cropped away. Same result, about a sixth fewer FLOPs.
    """

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int], window_size: int = 0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.window_size = window_size
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = linear(x, self.qkv.weight, self.qkv.bias)
        ws = self.window_size
        if ws > 0:
            Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
            if (Hp, Wp) != (H, W):
                padded = self.qkv.bias.to(qkv.dtype).expand(B, Hp, Wp, 3 * C).clone()
                padded[:, :H, :W] = qkv
                qkv = padded
            qkv, _ = window_partition(qkv, ws)
            out = self._attend(qkv, ws, ws)
            out = window_unpartition(out, ws, (Hp, Wp), (H, W))
        else:
            out = self._attend(qkv, H, W)
        return linear(out, self.proj.weight, self.proj.bias)

    def _attend(self, qkv: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Attention over (B, H, W, 3C) projected tokens; returns (B, H, W, C)."""
        B = qkv.shape[0]
        n = H * W
        # (3, B, heads, N, head_dim)
        q, k, v = qkv.reshape(B, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        rh = get_rel_pos(H, H, self.rel_pos_h).to(q.dtype)  # (H, H, head_dim)
        rw = get_rel_pos(W, W, self.rel_pos_w).to(q.dtype)
        qg = q.reshape(B, self.num_heads, H, W, -1)
        # Per-query bias over key rows and key columns: (B, heads, H, W, H) and (..., W)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", qg, rh)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", qg, rw)
        if q.device.type == "cpu" and not (torch.is_grad_enabled() and q.requires_grad):
            # (training keeps the fused kernel, whose backward stores no scores)
            step = max(1, _MAX_SCORE_ELEMENTS // (B * n * n))
            return self._attend_by_products(q, k, v, rel_h, rel_w, step).transpose(1, 2).reshape(B, H, W, -1)
        step = max(1, _MAX_BIAS_ELEMENTS // (B * n * n))
        outs = []
        for h0 in range(0, self.num_heads, step):
            sl = slice(h0, h0 + step)
            bias = (rel_h[:, sl, :, :, :, None] + rel_w[:, sl, :, :, None, :]).reshape(B, -1, n, n)
            outs.append(
                F.scaled_dot_product_attention(q[:, sl], k[:, sl], v[:, sl], attn_mask=bias, scale=self.scale)
            )
        x = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return x.transpose(1, 2).reshape(B, H, W, -1)

    def _attend_by_products(self, q, k, v, rel_h, rel_w, step: int) -> torch.Tensor:
        """Attention on a CPU as separate products, a group of heads at a time:
        (B, heads, N, head_dim).

        Measured in the encoder (2-core AMD EPYC with AVX-512), a global block's attention
        took 0.55 s this way against 0.77 s through the fused kernel with the bias as a
        mask of four heads, in float32 (the mask's 256 MiB no longer pass through memory
        twice); in bfloat16 0.35 s against 0.44 s, since the fused kernel runs bfloat16
        no faster than float32 while oneDNN's bfloat16 products run about twice as fast.
        In bfloat16 the scores are rounded before the softmax, as under the official
        code's autocast.
        """
        B, nh, n, d = q.shape
        out = q.new_empty(B, nh, n, d)
        for h0 in range(0, nh, step):
            sl = slice(h0, h0 + step)
            bias = (rel_h[:, sl, :, :, :, None] + rel_w[:, sl, :, :, None, :]).reshape(-1, n, n)
            keys_t = k[:, sl].reshape(-1, n, d).transpose(1, 2)
            scores = torch.baddbmm(bias, q[:, sl].reshape(-1, n, d), keys_t, alpha=self.scale)
            out[:, sl] = (scores.softmax(dim=-1) @ v[:, sl].reshape(-1, n, d)).view(B, -1, n, d)
        return out


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split (B, H, W, C) into zero-padded windows (B * nW, ws, ws, C); return padded (H, W)."""
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)
    return windows, (Hp, Wp)


def window_unpartition(windows: torch.Tensor, window_size: int, pad_hw, hw) -> torch.Tensor:
    """Inverse of :func:`window_partition`, dropping the padding."""
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // (Hp * Wp // window_size // window_size)
    x = windows.view(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()
    return x


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position embeddings for every (query, key) offset: (q_size, k_size, C).

    A table whose length does not match ``2 * max(q_size, k_size) - 1`` is resized
    linearly, as the official code does for inputs of another size.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = (
            F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear")
            .reshape(-1, max_rel_dist)
            .permute(1, 0)
        )
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]
