"""SAM 2's memory attention: the current frame's features attend to the memory bank.

Every layer is RoPE self-attention over the frame's tokens, RoPE cross-attention from
those tokens to the memories (spatial memories of earlier frames, then object-pointer
tokens, which get no rotation) and a feed-forward block, each pre-normed with a
residual. Rotary position encoding (RoPE) is 2D and axial: of a head's ``d`` channels,
read as ``d / 2`` complex numbers, the first half turns with the token's column and the
second half with its row, at ``d / 4`` frequencies ``theta ** (-4 i / d)``. Keys of a
memory bank hold several frames of the same grid, so their rotations repeat per frame
(``rope_k_repeat``).

Compared with the reference implementation this one does the same arithmetic with less
traffic: rotation tables are built once per grid; keys are rotated in place, frame by
frame through a broadcast table instead of a repeated copy; the key input
``memory + memory_pos`` is formed once for all layers; self-attention projects queries,
keys and values in one product; and the first layer's self-attention, which sees only
the current frame, is computed once for all objects tracked on that frame
(:meth:`MemoryAttention.forward` takes the frame with batch 1 and the memories with one
batch entry per object).
"""

from __future__ import annotations

import copy
import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..matmul import linear

__all__ = ["MemoryAttention", "MemoryAttentionLayer", "RoPEAttention", "axial_rotation"]


def axial_rotation(head_dim: int, end_x: int, end_y: int, theta: float = 10000.0,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Unit complex rotations of 2D axial RoPE for a grid of ``end_y`` rows by ``end_x`` columns.

    Returns
    -------
    (end_x * end_y, head_dim // 2) complex64: row ``n`` is the token at column
    ``n % end_x``, row ``n // end_x`` (row-major); the first ``head_dim // 4`` entries turn
    with the column, the others with the row.
    """
    if head_dim % 4:
        raise ValueError(f"2D rotary encoding needs a head width divisible by 4, not {head_dim}")
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim))
    t = torch.arange(end_x * end_y, dtype=torch.float32, device=device)
    t_x = t % end_x
    t_y = torch.div(t, end_x, rounding_mode="floor")
    angles = torch.cat([torch.outer(t_x, freqs), torch.outer(t_y, freqs)], dim=-1)
    return torch.polar(torch.ones_like(angles), angles)


def _rotate_(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, F * N, H, d) in place, frame by frame, by ``rotation`` (N, d/2)."""
    if x.shape[1] == 0:
        return x
    b, m, h, d = x.shape
    n = rotation.shape[0]
    if x.dtype == torch.float32:
        torch.view_as_complex(x.view(b, m // n, n, h, d // 2, 2)).mul_(rotation[:, None])
        return x
    # reduced precision: rotate in float32, as the reference does, and store back
    y = torch.view_as_complex(x.float().reshape(b, m // n, n, h, d // 2, 2)) * rotation[:, None]
    x.copy_(torch.view_as_real(y).reshape(b, m, h, d))
    return x


class RoPEAttention(nn.Module):
    """Multi-head attention with 2D rotary position encoding of queries and keys.

    Parameters
    ----------
    embedding_dim, num_heads
        Query width and heads; projections work at ``embedding_dim // downsample_rate``.
    kv_in_dim
        Width of key and value inputs (the memory's 64 in SAM 2.1), default ``embedding_dim``.
    rope_theta
        Base of the rotation frequencies.
    rope_k_repeat
        Keys are several frames of the query grid (cross-attention to memories): their
        rotations repeat every ``len(queries)`` keys.
    feat_sizes
        (width, height) of the grid the queries are on when there are exactly that many of
        them; any other count must be a square grid (as in the reference).
    dropout
        Kept for the official signature; inference only, never applied.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1, dropout: float = 0.0,
                 kv_in_dim: int | None = None, rope_theta: float = 10000.0, rope_k_repeat: bool = False,
                 feat_sizes: tuple[int, int] = (64, 64)):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.kv_in_dim = embedding_dim if kv_in_dim is None else kv_in_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"{self.internal_dim} channels do not split into {num_heads} heads")
        self.head_dim = self.internal_dim // num_heads
        if self.head_dim % 4:
            raise ValueError(f"2D rotary encoding needs a head width divisible by 4, not {self.head_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(self.kv_in_dim, self.internal_dim)
        self.v_proj = nn.Linear(self.kv_in_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        self.dropout = dropout
        self.rope_theta = rope_theta
        self.rope_k_repeat = rope_k_repeat
        self.feat_sizes = (int(feat_sizes[0]), int(feat_sizes[1]))
        # rotation tables, built when first needed (never a buffer: the model may be built
        # on the meta device and filled from a checkpoint)
        self._rotations: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def rotation(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """(num_tokens, head_dim // 2) complex rotations of the query grid."""
        w, h = self.feat_sizes
        if w * h != num_tokens:
            side = math.isqrt(num_tokens)
            if side * side != num_tokens:
                raise ValueError(f"{num_tokens} query tokens are neither the {w} x {h} grid nor a square one")
            w = h = side
        key = (w, h, torch.device(device))
        table = self._rotations.get(key)
        if table is None:
            table = axial_rotation(self.head_dim, w, h, self.rope_theta, device)
            self._rotations[key] = table
        return table

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0) -> torch.Tensor:
        """Attention on projected inputs (B, N, C'), rotating ``q`` and all keys but the last
        ``num_k_exclude_rope`` (in place: the caller hands over ``q`` and ``k``). Returns the
        heads recombined, before the output projection, (B, N, C')."""
        n, m = q.shape[1], k.shape[1]
        rotation = self.rotation(n, q.device)
        m_rope = m - num_k_exclude_rope
        if m_rope % n or (m_rope != n and not self.rope_k_repeat):
            raise ValueError(f"{m_rope} rotated keys do not match {n} queries (rope_k_repeat={self.rope_k_repeat})")
        qh, kh, vh = self._split(q), self._split(k), self._split(v)
        _rotate_(qh, rotation)
        _rotate_(kh[:, :m_rope], rotation)
        b = max(qh.shape[0], kh.shape[0])
        qh, kh, vh = (t.expand(b, -1, -1, -1).transpose(1, 2) for t in (qh, kh, vh))
        out = F.scaled_dot_product_attention(qh, kh, vh)
        return out.transpose(1, 2).reshape(b, n, self.internal_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0) -> torch.Tensor:
        """Queries (B, N, C) on the grid attend to keys/values (B, M, kv_in_dim); (B, N, C)."""
        out = self.attend(self.q_proj(q), self.k_proj(k), self.v_proj(v), num_k_exclude_rope)
        return linear(out, self.out_proj.weight, self.out_proj.bias)

    def self_attend(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x, x, x)`` with the three projections in one product."""
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        b = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        q, k, v = linear(x, w, b).split(self.internal_dim, dim=-1)
        # the split views share rows with the others: rotate copies, not the shared buffer
        out = self.attend(q.contiguous(), k.contiguous(), v)
        return linear(out, self.out_proj.weight, self.out_proj.bias)


class MemoryAttentionLayer(nn.Module):
    """Self-attention, cross-attention to the memory and a feed-forward block, pre-normed.

    Parameters follow the official layer: ``pos_enc_at_attn`` adds the query positional
    encoding before self-attention, ``pos_enc_at_cross_attn_queries`` / ``_keys`` before
    cross-attention; ``activation`` is ``"relu"`` or ``"gelu"``; ``dropout`` is kept for
    the signature and never applied (inference only).
    """

    def __init__(self, activation: str, cross_attention: RoPEAttention, d_model: int, dim_feedforward: int,
                 dropout: float, pos_enc_at_attn: bool, pos_enc_at_cross_attn_keys: bool,
                 pos_enc_at_cross_attn_queries: bool, self_attention: RoPEAttention):
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', not {activation!r}")
        self.d_model = d_model
        self.dim_feedforward = dim_feedforward
        self.dropout_value = dropout
        self.self_attn = self_attention
        self.cross_attn_image = cross_attention
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.activation = activation
        self.pos_enc_at_attn = pos_enc_at_attn
        self.pos_enc_at_cross_attn_queries = pos_enc_at_cross_attn_queries
        self.pos_enc_at_cross_attn_keys = pos_enc_at_cross_attn_keys

    def self_attention(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """``tgt`` (B, N, C) plus its self-attention."""
        x = self.norm1(tgt)
        if self.pos_enc_at_attn:
            qk = x + query_pos
            return tgt + self.self_attn(qk, qk, x)
        return tgt + self.self_attn.self_attend(x)

    def cross_attention(self, tgt: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor,
                        query_pos: torch.Tensor, num_k_exclude_rope: int) -> torch.Tensor:
        """``tgt`` (1 or B, N, C) plus its attention to the memory: ``keys`` (B, M, Cm) is the
        memory with or without its positional encoding, as this layer wants it."""
        x = self.norm2(tgt)
        if self.pos_enc_at_cross_attn_queries:
            x = x + query_pos
        return tgt + self.cross_attn_image(x, keys, memory, num_k_exclude_rope)

    def feed_forward(self, tgt: torch.Tensor) -> torch.Tensor:
        h = linear(self.norm3(tgt), self.linear1.weight, self.linear1.bias, self.activation)
        return tgt + linear(h, self.linear2.weight, self.linear2.bias)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor | None = None,
                query_pos: torch.Tensor | None = None, num_k_exclude_rope: int = 0) -> torch.Tensor:
        """One layer on batch-first tokens: ``tgt`` (B, N, C), ``memory`` and ``pos`` (B, M, Cm)."""
        query_pos = _zeros_if_none(query_pos, tgt)
        keys = memory + pos if self.pos_enc_at_cross_attn_keys and pos is not None else memory
        tgt = self.self_attention(tgt, query_pos)
        tgt = self.cross_attention(tgt, keys, memory, query_pos, num_k_exclude_rope)
        return self.feed_forward(tgt)


def _zeros_if_none(pos: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if pos is None else pos


class MemoryAttention(nn.Module):
    """``num_layers`` copies of ``layer`` and a final LayerNorm (keys ``layers.N.*``, ``norm``).

    Parameters
    ----------
    d_model
        Token width (256).
    pos_enc_at_input
        Add 0.1 x the positional encoding to the frame's tokens first.
    layer
        The layer to clone.
    batch_first
        Kept for the official signature; this implementation takes batch-first tokens and
        accepts only True (as every official configuration).
    """

    def __init__(self, d_model: int, pos_enc_at_input: bool, layer: MemoryAttentionLayer, num_layers: int,
                 batch_first: bool = True):
        super().__init__()
        if not batch_first:
            raise ValueError("only batch_first=True is supported (as in every official configuration)")
        self.d_model = d_model
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(d_model)
        self.pos_enc_at_input = pos_enc_at_input
        self.batch_first = batch_first

    def layer(self, i: int) -> MemoryAttentionLayer:
        return cast(MemoryAttentionLayer, self.layers[i])

    def first_self_attention(self, curr: torch.Tensor, curr_pos: torch.Tensor) -> torch.Tensor:
        """The input scaling and the first layer's self-attention, which depend on the
        frame only: compute once per frame and pass as ``first`` to :meth:`forward` for
        every object or group of objects tracked on it. (1 or B, N, C)."""
        x = curr + 0.1 * curr_pos if self.pos_enc_at_input else curr
        return self.layer(0).self_attention(x, curr_pos)

    def forward(self, curr: torch.Tensor, memory: torch.Tensor, curr_pos: torch.Tensor,
                memory_pos: torch.Tensor, num_obj_ptr_tokens: int = 0,
                first: torch.Tensor | None = None) -> torch.Tensor:
        """Condition the frame's tokens on the memory bank.

        Parameters
        ----------
        curr
            (1 or B, N, C) tokens of the frame's lowest-resolution features, row-major over
            the (h, w) grid; batch 1 serves all B objects.
        memory
            (B, M, Cm) memory tokens: F frames of N spatial tokens, then
            ``num_obj_ptr_tokens`` object-pointer tokens (not rotated).
        curr_pos, memory_pos
            Positional encodings like ``curr`` and ``memory``.
        first
            :meth:`first_self_attention` of this frame, if already computed.

        Returns
        -------
        (B, N, C) conditioned tokens.
        """
        if memory.shape[0] != memory_pos.shape[0] or memory.shape[1] != memory_pos.shape[1]:
            raise ValueError(f"memory {tuple(memory.shape)} and memory_pos {tuple(memory_pos.shape)} differ")
        tgt = self.first_self_attention(curr, curr_pos) if first is None else first
        keys_with_pos = memory + memory_pos
        for i in range(self.num_layers):
            layer = self.layer(i)
            if i > 0:
                tgt = layer.self_attention(tgt, curr_pos)
            keys = keys_with_pos if layer.pos_enc_at_cross_attn_keys else memory
            tgt = layer.cross_attention(tgt, keys, memory, curr_pos, num_obj_ptr_tokens)
            tgt = layer.feed_forward(tgt)
        return self.norm(tgt)
