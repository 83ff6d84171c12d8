"""The two-way transformer at the heart of SAM's mask decoder.

Prompt tokens (queries) and image tokens (keys) attend to each other in both directions.
In the first layer, before any token has touched the image, the image side depends only
on the image embedding (when no mask prompt is given): its key, value and query
projections can therefore be computed once per image and reused for every click. That
is :meth:`TwoWayTransformer.image_context`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock
from .matmul import linear, matmul_nt


@dataclass
class ImageContext:
    """Prompt-independent image-side tensors, computed once per image.

    ``keys`` and ``key_pe`` are (1, N, C) image tokens and their positional encoding
    (N = 64 * 64), ``keys_pe`` their sum; ``t2i_k``, ``t2i_v`` and ``i2t_q`` are the first
    layer's image-side projections. All broadcast over a batch of prompts; a context
    built for B mask prompts holds B sets of image tokens (``key_pe`` stays (1, N, C)).
    """

    keys: torch.Tensor
    key_pe: torch.Tensor
    keys_pe: torch.Tensor
    t2i_k: torch.Tensor
    t2i_v: torch.Tensor
    i2t_q: torch.Tensor


# With a cached image context the decoder takes a cheaper route to the same numbers.
# A prompt has ~7 tokens while the image has 4096, so instead of projecting all image
# tokens (4096 x 256 -> 128 per projection) the projections are moved to the token side:
#   q . (Wk x + bk)      = (Wk^T q) . x + const      (the constant cancels in the softmax)
#   sum_j p_j (Wv x_j + bv) = Wv (sum_j p_j x_j) + bv  (softmax rows sum to one)
#   Wo (sum_t p_t v_t)   = sum_t p_t (Wo v_t)          (output projection folded into values)
# Each image-side product then has 8 heads x 7 tokens = 56 columns instead of 128 or 256:
# about 2.3x fewer FLOPs per click. Only summation order differs from the plain route.


def _times_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.transpose(1, 2)`` for (B, M, C) by (1 or B, N, C), one image."""
    if a.shape[0] == 1 and b.shape[0] == 1:
        return matmul_nt(a[0], b[0])[None]
    return a @ b.transpose(1, 2)


def _absorbed_token_to_image(attn: "Attention", q: torch.Tensor, x: torch.Tensor, x_pe: torch.Tensor) -> torch.Tensor:
    """Tokens (B, T, C) attend to image tokens ``x`` (values) keyed by ``x_pe``; (B, T, C)."""
    B, T, _ = q.shape
    H = attn.num_heads
    d = attn.internal_dim // H
    qh = attn.q_proj(q).reshape(B, T, H, d)
    wk = attn.k_proj.weight.reshape(H, d, -1)
    q_abs = torch.einsum("bthd,hdc->bhtc", qh, wk).reshape(B, H * T, -1)
    scores = _times_t(q_abs, x_pe) * (d**-0.5)  # (B, H*T, N)
    px = _times_t(scores.softmax(dim=-1), x.transpose(1, 2))  # (B, H*T, C)
    wv = attn.v_proj.weight.reshape(H, d, -1)
    out = torch.einsum("bhtc,hdc->bthd", px.reshape(B, H, T, -1), wv) + attn.v_proj.bias.reshape(H, d)
    return attn.out_proj(out.reshape(B, T, H * d))


def _absorbed_image_to_token(
    attn: "Attention",
    keys: torch.Tensor,
    k_tok: torch.Tensor,
    v_tok: torch.Tensor,
    keys_pe: torch.Tensor | None = None,
    q_img: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image tokens attend to prompt tokens; returns ``keys`` + attention output (B, N, C).

    The image queries are either ``q_img`` (already projected, (1 or B, N, C')) or
    ``keys_pe`` (unprojected, then the query projection is absorbed into the keys).
    """
    B, T, _ = k_tok.shape
    H = attn.num_heads
    d = attn.internal_dim // H
    kh = attn.k_proj(k_tok).reshape(B, T, H, d)
    if q_img is not None:
        qh = q_img.reshape(q_img.shape[0], -1, H, d).permute(0, 2, 3, 1)  # (b, H, d, N)
        scores = kh.permute(0, 2, 1, 3) @ qh  # (B, H, T, N)
    else:
        if keys_pe is None:
            raise ValueError("image-to-token attention needs q_img or keys_pe")
        wq = attn.q_proj.weight.reshape(H, d, -1)
        k_abs = torch.einsum("bthd,hdc->bhtc", kh, wq).reshape(B, H * T, -1)
        k_bias = torch.einsum("bthd,hd->bht", kh, attn.q_proj.bias.reshape(H, d)).reshape(B, H * T, 1)
        scores = (_times_t(k_abs, keys_pe) + k_bias).reshape(B, H, T, -1)
    # softmax over the T prompt tokens, along the short axis of a contiguous layout
    p = (scores * (d**-0.5)).softmax(dim=2).reshape(B, H * T, -1)
    vh = attn.v_proj(v_tok).reshape(B, T, H, d)
    wo = attn.out_proj.weight.reshape(-1, H, d)
    # Every image token's weights sum to one per head, so the output bias rides along
    # as bias / H on every value row instead of costing a pass over the image tokens.
    v_abs = (torch.einsum("bthd,chd->bhtc", vh, wo) + attn.out_proj.bias / H).reshape(B, H * T, -1)
    return torch.baddbmm(keys.expand(B, -1, -1), p.transpose(1, 2), v_abs)


class Attention(nn.Module):
    """Multi-head attention whose projections may downsample the width (``downsample_rate``)."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"{self.internal_dim} channels do not split into {num_heads} heads")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention on already projected inputs; batch dimensions broadcast."""
        b = max(q.shape[0], k.shape[0])
        q, k, v = (self._heads(t).expand(b, -1, -1, -1) for t in (q, k, v))
        if k.shape[-2] < q.shape[-2]:
            # Image tokens attending to a handful of prompt tokens: a softmax over rows
            # of ~7 is slow, so compute the scores transposed and normalise along the
            # long, contiguous axis instead (same numbers, several times faster).
            scores = (k @ q.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
            out = scores.softmax(dim=-2).transpose(-1, -2) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        _, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attend(self.q_proj(q), self.k_proj(k), self.v_proj(v))


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of the tokens, tokens -> image, MLP on the tokens, image -> tokens."""

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int, downsample_rate: int,
                 skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        queries = self._self_attention(queries, query_pe)
        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys

    def forward_cached(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        context: ImageContext | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same block by the absorbed-projection route; ``context`` (first layer only)
        supplies the image-side projections that do not depend on the prompt."""
        queries = self._self_attention(queries, query_pe)
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        q = queries + query_pe
        if context is not None:
            attn_out = t2i.attend(t2i.q_proj(q), context.t2i_k, context.t2i_v)
            keys_pe = None
        else:
            keys_pe = keys + key_pe
            attn_out = _absorbed_token_to_image(t2i, q, keys, keys_pe)
        queries = self.norm2(queries + attn_out)
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        q_img = context.i2t_q if context is not None else None
        keys = self.norm4(_absorbed_image_to_token(i2t, keys, q, queries, keys_pe, q_img))
        return queries, keys

    def _self_attention(self, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        return self.norm1(queries)


class TwoWayTransformer(nn.Module):
    """Decoder transformer: ``depth`` two-way blocks and a final token -> image attention.

    Parameters
    ----------
    depth, embedding_dim, num_heads, mlp_dim
        2, 256, 8 and 2048 in every official SAM.
    attention_downsample_rate
        Cross-attention works at ``embedding_dim / rate`` channels (128).
    """

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int,
                 attention_downsample_rate: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim, num_heads, mlp_dim, attention_downsample_rate, skip_first_layer_pe=i == 0
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def _block(self, i: int) -> TwoWayAttentionBlock:
        # ModuleList items are typed as plain Modules; these are the blocks built above.
        return cast(TwoWayAttentionBlock, self.layers[i])

    def image_context(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor | None = None, key_pe: torch.Tensor | None = None
    ) -> ImageContext:
        """Precompute the first layer's image-side projections.

        Parameters
        ----------
        image_embedding
            (1 or B, C, h, w) image embedding with the dense prompt embedding already
            added (B: one mask prompt each).
        image_pe
            (1, C, h, w) positional encoding of the grid.
        key_pe
            Or the same as (1, h * w, C) tokens, as an earlier context holds them.
        """
        # Contiguous token-major copies: every click reads them several times, and
        # strided (transposed) reads are several times slower on a CPU.
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        if key_pe is None:
            if image_pe is None:
                raise ValueError("an image context needs image_pe or key_pe")
            key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        first = self._block(0)
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        k = keys + key_pe
        return ImageContext(
            keys=keys,
            key_pe=key_pe,
            keys_pe=k,
            t2i_k=linear(k, t2i.k_proj.weight, t2i.k_proj.bias),
            t2i_v=linear(keys, t2i.v_proj.weight, t2i.v_proj.bias),
            i2t_q=linear(k, i2t.q_proj.weight, i2t.q_proj.bias),
        )

    def forward(
        self,
        point_embedding: torch.Tensor,
        image_embedding: torch.Tensor | None = None,
        image_pe: torch.Tensor | None = None,
        context: ImageContext | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the transformer.

        Either ``image_embedding`` (B, C, h, w) and ``image_pe`` (1, C, h, w) are given, or a
        ``context`` from :meth:`image_context` that broadcasts over the B prompts.

        Returns
        -------
        queries : (B, T, C) processed prompt tokens
        keys : (B, h * w, C) processed image tokens
        """
        queries = point_embedding
        final = self.final_attn_token_to_image
        if context is None:
            if image_embedding is None or image_pe is None:
                raise ValueError("the transformer needs image_embedding and image_pe, or a context")
            keys = image_embedding.flatten(2).transpose(1, 2)
            key_pe = image_pe.flatten(2).transpose(1, 2)
            for layer in self.layers:
                queries, keys = layer(queries, keys, point_embedding, key_pe)
            q = queries + point_embedding
            attn_out = final(q, keys + key_pe, keys)
        else:
            keys, key_pe = context.keys, context.key_pe
            for i in range(len(self.layers)):
                queries, keys = self._block(i).forward_cached(
                    queries, keys, point_embedding, key_pe, context if i == 0 else None
                )
            attn_out = _absorbed_token_to_image(final, queries + point_embedding, keys, keys + key_pe)
        queries = self.norm_final_attn(queries + attn_out)
        return queries, keys
