"""The two-way transformer at the heart of SAM's mask decoder.

Prompt tokens (queries) and image tokens (keys) attend to each other in both directions.
In the first layer, before any token has touched the image, the image side depends only
on the image embedding (when no mask prompt is given): its key, value and query
projections can therefore be computed once per image and reused for every click. That
is :meth:`TwoWayTransformer.image_context`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock


@dataclass
class ImageContext:
    """Prompt-independent image-side tensors, computed once per image.

    ``t2i_k``, ``t2i_v`` and ``i2t_q`` are the first layer's image-side projections
    (1, N, C') with N = 64 * 64 image tokens; they broadcast over a batch of prompts.
    ``fused`` holds, for every later layer and then the final attention, a stacked weight
    and a (N, C') matrix holding the positional encoding's share of each projection plus
    its bias: the image side of those layers then costs one GEMM with a matrix bias
    instead of several GEMMs and additions of the positional encoding.
    """

    keys: torch.Tensor
    key_pe: torch.Tensor
    t2i_k: torch.Tensor
    t2i_v: torch.Tensor
    i2t_q: torch.Tensor
    fused: list[tuple[torch.Tensor, torch.Tensor]]


def _fused_image_projections(modules, key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the image-side projections ``modules`` = [(linear, with_pe), ...] into one weight
    and a bias matrix: ``x @ W.T + B`` equals ``[lin(x + pe) if with_pe else lin(x), ...]``."""
    weight = torch.cat([lin.weight for lin, _ in modules], dim=0)
    pe = key_pe[0]
    bias = torch.cat(
        [(pe @ lin.weight.t() + lin.bias) if with_pe else lin.bias.expand(pe.shape[0], -1) for lin, with_pe in modules],
        dim=1,
    )
    return weight, bias


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T + bias`` for (B, N, C) tokens and an (N, C') bias matrix, fused."""
    if x.shape[0] == 1:
        return torch.addmm(bias, x[0], weight.t())[None]
    return torch.baddbmm(bias.expand(x.shape[0], -1, -1), x, weight.t().expand(x.shape[0], -1, -1))


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

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool):
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
        context: ImageContext | None = None,
        fused: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block. ``context`` replaces the image side of the first layer, ``fused``
        (see :class:`ImageContext`) the image-side projections of a later one."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        t2i = self.cross_attn_token_to_image
        q = queries + query_pe
        i2t = self.cross_attn_image_to_token
        i2t_q = None
        if context is not None:
            t2i_k, t2i_v, i2t_q = context.t2i_k, context.t2i_v, context.i2t_q
        elif fused is not None:
            t2i_k, t2i_v, i2t_q = _affine(keys, *fused).split(t2i.internal_dim, dim=-1)
        else:
            k = keys + key_pe
            t2i_k, t2i_v = t2i.k_proj(k), t2i.v_proj(keys)
        queries = self.norm2(queries + t2i.attend(t2i.q_proj(q), t2i_k, t2i_v))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        if i2t_q is None:
            i2t_q = i2t.q_proj(keys + key_pe)
        keys = self.norm4(keys + i2t.attend(i2t_q, i2t.k_proj(q), i2t.v_proj(queries)))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Decoder transformer: ``depth`` two-way blocks and a final token -> image attention.

    Parameters
    ----------
    depth, embedding_dim, num_heads, mlp_dim
        2, 256, 8 and 2048 in every official SAM.
    attention_downsample_rate
        Cross-attention works at ``embedding_dim / rate`` channels (128).
    """

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int, attention_downsample_rate: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, attention_downsample_rate, skip_first_layer_pe=i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def image_context(self, image_embedding: torch.Tensor, image_pe: torch.Tensor) -> ImageContext:
        """Precompute the first layer's image-side projections.

        Parameters
        ----------
        image_embedding
            (1, C, h, w) image embedding with the dense prompt embedding already added.
        image_pe
            (1, C, h, w) positional encoding of the grid.
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        first = self.layers[0]
        k = keys + key_pe
        fused = [
            _fused_image_projections(
                [
                    (layer.cross_attn_token_to_image.k_proj, True),
                    (layer.cross_attn_token_to_image.v_proj, False),
                    (layer.cross_attn_image_to_token.q_proj, True),
                ],
                key_pe,
            )
            for layer in self.layers[1:]
        ]
        final = self.final_attn_token_to_image
        fused.append(_fused_image_projections([(final.k_proj, True), (final.v_proj, False)], key_pe))
        return ImageContext(
            keys=keys,
            key_pe=key_pe,
            t2i_k=first.cross_attn_token_to_image.k_proj(k),
            t2i_v=first.cross_attn_token_to_image.v_proj(keys),
            i2t_q=first.cross_attn_image_to_token.q_proj(k),
            fused=fused,
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
        if context is None:
            context_first = None
            keys = image_embedding.flatten(2).transpose(1, 2)
            key_pe = image_pe.flatten(2).transpose(1, 2)
        else:
            context_first = context
            keys, key_pe = context.keys, context.key_pe
        queries = point_embedding
        for i, layer in enumerate(self.layers):
            fused = context.fused[i - 1] if context is not None and i > 0 else None
            queries, keys = layer(queries, keys, point_embedding, key_pe, context_first if i == 0 else None, fused)
        final = self.final_attn_token_to_image
        q = queries + point_embedding
        if context is not None:
            k, v = _affine(keys, *context.fused[-1]).split(final.internal_dim, dim=-1)
            attn_out = final.attend(final.q_proj(q), k, v)
        else:
            attn_out = final(q, keys + key_pe, keys)
        queries = self.norm_final_attn(queries + attn_out)
        return queries, keys
