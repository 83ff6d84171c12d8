"""SAM 2's tracking step: a frame's features conditioned on an object's memories, the
mask heads, and the new memory the result leaves behind (inference only).

This is the arithmetic of the official ``SAM2Base.track_step`` and its helpers
(``_prepare_memory_conditioned_features``, ``_encode_new_memory``, the object pointers
and temporal encodings) as functions of a :class:`~.sam2.Sam2`, for several objects at
once. What one object remembers is an :class:`ObjectMemory`: its outputs on
conditioning frames (frames the user prompted) and on the other frames it was tracked
through, by frame index.

For a frame being tracked, an object attends to:

- its conditioning frames (all, or the ``max_cond_frames_in_attn`` closest in time), at
  temporal position 0;
- the ``num_maskmem - 1`` frames just before it in the direction of tracking (just after
  it when tracking in reverse), at temporal positions ``num_maskmem - 1`` (the nearest)
  down to 1, taken every ``memory_temporal_stride_for_eval`` frames beyond the nearest;
- object pointers (one per frame, from the mask decoder's output token) of its
  conditioning frames (only those not ahead of the frame, with
  ``only_obj_ptrs_in_the_past_for_eval``) and of up to ``max_obj_ptrs_in_encoder - 1``
  preceding frames, each with a sine encoding of its signed or absolute distance in
  frames, split into ``hidden_dim / mem_dim`` tokens of the memory width.

Objects are batched: the frame's first self-attention and the memory encoder's frame
projection are computed once for all of them, and objects whose memory banks have the
same size share one pass of memory attention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from .memory_attention import MemoryAttention
from .memory_encoder import MemoryEncoder

if TYPE_CHECKING:
    from .sam2 import Sam2

__all__ = [
    "FrameFeatures", "FrameOutput", "ObjectMemory", "encode_new_memory", "frame_features",
    "memory_conditioned_features", "select_closest_cond_frames", "sine_encoding_1d", "track_step",
]

MEMORY_DTYPE = torch.bfloat16
"""Storage type of spatial memories, as the official video predictor keeps them (half
the memory; the rounding is part of the reference numbers)."""


@dataclass
class FrameFeatures:
    """One frame's image features as tracking reads them (batch 1, shared by every object).

    ``tokens`` and ``pos`` are the lowest-resolution level as (1, h * w, C) row-major
    tokens and its positional encoding; ``pix_feat`` is the same level as a (1, C, h, w)
    map; ``high_res`` the two finer levels for the mask decoder, or None; ``first`` caches
    the memory attention's first self-attention of this frame once computed.
    """

    tokens: torch.Tensor
    pos: torch.Tensor
    pix_feat: torch.Tensor
    high_res: list[torch.Tensor] | None
    grid: tuple[int, int]
    first: torch.Tensor | None = None


@dataclass
class FrameOutput:
    """What tracking leaves for B objects on one frame (official per-frame output).

    pred_masks : (B, 1, S/4, S/4) low-resolution mask logits (S the model input size)
    obj_ptr : (B, C) object pointers
    object_score_logits : (B, 1) presence logits
    maskmem_features : (B, h * w, mem_dim) spatial memory tokens (bfloat16), or None until encoded
    """

    pred_masks: torch.Tensor
    obj_ptr: torch.Tensor
    object_score_logits: torch.Tensor
    maskmem_features: torch.Tensor | None = None

    def select(self, i: int) -> "FrameOutput":
        """The output of object ``i`` alone (batch 1, views)."""
        mem = None if self.maskmem_features is None else self.maskmem_features[i:i + 1]
        return FrameOutput(self.pred_masks[i:i + 1], self.obj_ptr[i:i + 1], self.object_score_logits[i:i + 1], mem)


@dataclass
class ObjectMemory:
    """One object's outputs by frame index: on conditioning frames (``cond``) and on the
    other frames it was tracked through (``non_cond``). Insertion order is kept, as the
    selection of conditioning frames reads it."""

    cond: dict[int, FrameOutput] = field(default_factory=dict)
    non_cond: dict[int, FrameOutput] = field(default_factory=dict)


def frame_features(model: "Sam2", backbone_out: Mapping[str, Any]) -> FrameFeatures:
    """Prepare :meth:`Sam2.forward_image`'s output (batch 1) of one frame for tracking."""
    levels = model.num_feature_levels
    fpn, pos = list(backbone_out["backbone_fpn"]), list(backbone_out["vision_pos_enc"])
    if len(fpn) < levels or len(pos) < levels:
        raise ValueError(f"frame features have {len(fpn)} levels, the model needs {levels}")
    top, top_pos = fpn[-1], pos[-1]
    if top.shape[0] != 1:
        raise ValueError(f"frame features must have batch 1, not {top.shape[0]}")
    h, w = int(top.shape[-2]), int(top.shape[-1])
    return FrameFeatures(
        tokens=top.flatten(2).transpose(1, 2).contiguous(),
        pos=top_pos[:1].flatten(2).transpose(1, 2).contiguous(),
        pix_feat=top,
        high_res=list(fpn[-levels:-1]) if levels > 1 else None,
        grid=(h, w),
    )


def select_closest_cond_frames(frame_idx: int, cond: Mapping[int, Any],
                               max_cond_frame_num: int) -> tuple[dict[int, Any], dict[int, Any]]:
    """Up to ``max_cond_frame_num`` conditioning frames nearest ``frame_idx`` (-1: all).

    The nearest before and the nearest at-or-after come first, then the others by
    distance. Returns (selected, unselected) as dicts by frame index.
    """
    if max_cond_frame_num == -1 or len(cond) <= max_cond_frame_num:
        return dict(cond), {}
    if max_cond_frame_num < 2:
        raise ValueError(f"max_cond_frames_in_attn must be -1 or at least 2, not {max_cond_frame_num}")
    selected: dict[int, Any] = {}
    before = max((t for t in cond if t < frame_idx), default=None)
    if before is not None:
        selected[before] = cond[before]
    after = min((t for t in cond if t >= frame_idx), default=None)
    if after is not None:
        selected[after] = cond[after]
    rest = sorted((t for t in cond if t not in selected), key=lambda t: abs(t - frame_idx))
    for t in rest[: max_cond_frame_num - len(selected)]:
        selected[t] = cond[t]
    return selected, {t: v for t, v in cond.items() if t not in selected}


def sine_encoding_1d(positions: torch.Tensor, dim: int, temperature: float = 10000) -> torch.Tensor:
    """(P,) positions -> (P, dim) encoding: sines then cosines over ``dim / 2`` wavelengths."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=positions.device)
    dim_t = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / half)
    angles = positions[:, None] / dim_t
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def _memory_frames(model: "Sam2", frame_idx: int, memory: ObjectMemory, selected: Mapping[int, FrameOutput],
                   unselected: Mapping[int, FrameOutput], reverse: bool) -> list[tuple[int, FrameOutput]]:
    """(temporal position, output) of the spatial memories a tracked frame attends to."""
    c = model.config
    n = model.num_maskmem
    stride = c.memory_temporal_stride_for_eval
    frames = [(0, out) for out in selected.values()]
    for t_pos in range(1, n):
        t_rel = n - t_pos  # frames away from the current one
        if t_rel == 1:
            prev = frame_idx + 1 if reverse else frame_idx - 1
        elif not reverse:
            prev = ((frame_idx - 2) // stride) * stride - (t_rel - 2) * stride
        else:
            prev = -(-(frame_idx + 2) // stride) * stride + (t_rel - 2) * stride
        out = memory.non_cond.get(prev, unselected.get(prev))
        if out is not None:
            frames.append((t_pos, out))
    return frames


def _pointers(model: "Sam2", frame_idx: int, memory: ObjectMemory, selected: Mapping[int, FrameOutput],
              unselected: Mapping[int, FrameOutput], num_frames: int,
              reverse: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Object-pointer tokens (P * k, mem_dim) and their encodings, or None."""
    c = model.config
    max_ptrs = min(num_frames, c.max_obj_ptrs_in_encoder)
    cond = selected
    if c.only_obj_ptrs_in_the_past_for_eval:
        cond = {t: o for t, o in selected.items() if (t >= frame_idx if reverse else t <= frame_idx)}
    sign = -1 if reverse else 1
    found = [((frame_idx - t) * sign if c.use_signed_tpos_enc_to_obj_ptrs else abs(frame_idx - t), o.obj_ptr)
             for t, o in cond.items()]
    for t_diff in range(1, max_ptrs):
        t = frame_idx + t_diff if reverse else frame_idx - t_diff
        if t < 0 or t >= num_frames:
            break
        out = memory.non_cond.get(t, unselected.get(t))
        if out is not None:
            found.append((t_diff, out.obj_ptr))
    if not found:
        return None
    C, mem_dim = model.hidden_dim, model.mem_dim
    ptrs = torch.cat([p for _, p in found])  # (P, C)
    if c.add_tpos_enc_to_obj_ptrs:
        # a single-frame video has no distance to normalise by; keep the encoding finite
        t_diff_max = max(max_ptrs - 1, 1)
        dists = torch.tensor([d for d, _ in found], device=ptrs.device) / t_diff_max
        enc = sine_encoding_1d(dists, C if c.proj_tpos_enc_in_obj_ptrs else mem_dim)
        pos = model.obj_ptr_tpos_proj(enc)
    else:
        pos = ptrs.new_zeros(len(found), mem_dim)
    if mem_dim < C:
        # a pointer of C channels becomes C / mem_dim consecutive memory tokens
        ptrs = ptrs.reshape(-1, mem_dim)
        pos = pos.repeat_interleave(C // mem_dim, dim=0)
    return ptrs, pos


def memory_bank(model: "Sam2", frame_idx: int, memory: ObjectMemory, num_frames: int, reverse: bool,
                memory_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One object's memory for a tracked (not initial-conditioning) frame.

    Parameters
    ----------
    memory_pos
        (h * w, mem_dim) spatial positional encoding of memory tokens.

    Returns
    -------
    memory : (M, mem_dim) spatial memory tokens frame after frame, then pointer tokens
    pos : (M, mem_dim) their positional (spatial + temporal) encodings
    num_ptr_tokens : how many of the last tokens are object pointers
    """
    if not memory.cond:
        raise ValueError(f"frame {frame_idx} is tracked, but the object has no conditioning frame")
    selected, unselected = select_closest_cond_frames(frame_idx, memory.cond, model.config.max_cond_frames_in_attn)
    tokens, pos = [], []
    tpos = model.maskmem_tpos_enc
    for t_pos, out in _memory_frames(model, frame_idx, memory, selected, unselected, reverse):
        if out.maskmem_features is None:
            raise ValueError(f"a memory frame of frame {frame_idx} has no encoded memory")
        tokens.append(out.maskmem_features[0])
        pos.append(memory_pos + tpos[model.num_maskmem - t_pos - 1, 0])
    num_ptr = 0
    if model.config.use_obj_ptrs_in_encoder:
        found = _pointers(model, frame_idx, memory, selected, unselected, num_frames, reverse)
        if found is not None:
            tokens.append(found[0])
            pos.append(found[1])
            num_ptr = found[0].shape[0]
    dtype = memory_pos.dtype
    return torch.cat([t.to(dtype) for t in tokens]), torch.cat(pos), num_ptr


def _memory_pos(model: "Sam2", grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(h * w, mem_dim) spatial positional encoding of memory tokens (the memory
    encoder's, which depends on the grid only)."""
    probe = torch.empty(1, model.mem_dim, *grid, device=device)
    return _encoder(model).position_encoding(probe)[0].flatten(1).transpose(0, 1)


def _encoder(model: "Sam2") -> MemoryEncoder:
    return cast(MemoryEncoder, model.memory_encoder)


def _attention(model: "Sam2") -> MemoryAttention:
    return cast(MemoryAttention, model.memory_attention)


def memory_conditioned_features(model: "Sam2", frame: FrameFeatures, frame_idx: int, is_init_cond_frame: bool,
                                memories: Sequence[ObjectMemory], num_frames: int,
                                reverse: bool = False) -> torch.Tensor:
    """The frame's lowest-resolution features conditioned on each object's memory.

    Returns
    -------
    (B, C, h, w) for the B objects of ``memories`` (official
    ``_prepare_memory_conditioned_features``).
    """
    B = len(memories)
    C = model.hidden_dim
    h, w = frame.grid
    if model.num_maskmem == 0:
        return frame.pix_feat.expand(B, -1, -1, -1)
    if is_init_cond_frame:
        if not model.config.directly_add_no_mem_embed:
            raise ValueError("initial conditioning frames need directly_add_no_mem_embed=True (every SAM 2.1 model)")
        feat = (frame.tokens + model.no_mem_embed).transpose(1, 2).reshape(1, C, h, w)
        return feat.expand(B, -1, -1, -1)
    attention = _attention(model)
    if frame.first is None:
        frame.first = attention.first_self_attention(frame.tokens, frame.pos)
    mem_pos = _memory_pos(model, frame.grid, frame.tokens.device)
    banks = [memory_bank(model, frame_idx, m, num_frames, reverse, mem_pos) for m in memories]
    out = torch.empty(B, C, h, w, dtype=frame.tokens.dtype, device=frame.tokens.device)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (mem, _, num_ptr) in enumerate(banks):
        groups.setdefault((mem.shape[0], num_ptr), []).append(i)
    for (_, num_ptr), members in groups.items():
        memory = torch.stack([banks[i][0] for i in members])
        pos = torch.stack([banks[i][1] for i in members])
        tokens = attention(frame.tokens, memory, frame.pos, pos, num_ptr, first=frame.first)
        out[members] = tokens.transpose(1, 2).reshape(len(members), C, h, w)
    return out


def encode_new_memory(model: "Sam2", frame: FrameFeatures, pred_masks_high_res: torch.Tensor,
                      object_score_logits: torch.Tensor, is_mask_from_pts: bool) -> torch.Tensor:
    """Spatial memories of B objects on one frame (official ``_encode_new_memory``).

    Parameters
    ----------
    pred_masks_high_res
        (B, 1, S, S) mask logits at the model input size.
    object_score_logits
        (B, 1) presence logits; absent objects get the ``no_obj_embed_spatial`` offset.
    is_mask_from_pts
        The masks answer clicks (binarised first when the model says so).

    Returns
    -------
    (B, h * w, mem_dim) memory tokens in :data:`MEMORY_DTYPE`.
    """
    c = model.config
    if c.binarize_mask_from_pts_for_mem_enc and is_mask_from_pts:
        mask = (pred_masks_high_res > 0).float()
    else:
        mask = torch.sigmoid(pred_masks_high_res)
    if c.sigmoid_scale_for_mem_enc != 1.0:
        mask = mask * c.sigmoid_scale_for_mem_enc
    if c.sigmoid_bias_for_mem_enc != 0.0:
        mask = mask + c.sigmoid_bias_for_mem_enc
    feats, _ = _encoder(model)(frame.pix_feat, mask.to(frame.pix_feat.dtype), skip_mask_sigmoid=True)
    no_obj = getattr(model, "no_obj_embed_spatial", None)
    if no_obj is not None:
        absent = 1 - (object_score_logits > 0).float()  # (B, 1)
        feats = feats + absent[..., None, None] * no_obj[..., None, None]
    return feats.flatten(2).transpose(1, 2).to(MEMORY_DTYPE)


def _use_multimask(model: "Sam2", is_init_cond_frame: bool, point_inputs: Mapping[str, torch.Tensor] | None) -> bool:
    c = model.config
    num_pts = 0 if point_inputs is None else point_inputs["point_labels"].shape[1]
    return (c.multimask_output_in_sam and (is_init_cond_frame or c.multimask_output_for_tracking)
            and c.multimask_min_pt_num <= num_pts <= c.multimask_max_pt_num)


def _expand(maps: list[torch.Tensor] | None, B: int) -> list[torch.Tensor] | None:
    return None if maps is None else [m.expand(B, -1, -1, -1) for m in maps]


def track_step(model: "Sam2", frame: FrameFeatures, frame_idx: int, memories: Sequence[ObjectMemory], *,
               is_init_cond_frame: bool, num_frames: int, reverse: bool = False,
               point_inputs: Mapping[str, torch.Tensor] | None = None, mask_inputs: torch.Tensor | None = None,
               run_mem_encoder: bool = True, prev_sam_mask_logits: torch.Tensor | None = None) -> FrameOutput:
    """Segment B objects on one frame from their prompts and memories (official ``track_step``).

    Parameters
    ----------
    memories
        The B objects' memories (read, not changed).
    point_inputs
        ``{"point_coords": (B, P, 2) (x, y) in the S x S model-input frame,
        "point_labels": (B, P)}``, or None.
    mask_inputs
        (B, 1, S, S) mask prompt, or None (not together with points).
    run_mem_encoder
        Also encode the result as a spatial memory.
    prev_sam_mask_logits
        (B, 1, S/4, S/4) earlier logits of these objects on this frame, fed to the decoder
        with new clicks.
    """
    B = len(memories)
    if point_inputs is not None and mask_inputs is not None:
        raise ValueError("points and a mask cannot prompt the same frame together")
    high_res = _expand(frame.high_res, B)
    if mask_inputs is not None and model.config.use_mask_input_as_output_without_sam:
        outs = model.use_mask_as_output(frame.pix_feat.expand(B, -1, -1, -1), high_res, mask_inputs)
    else:
        pix = memory_conditioned_features(model, frame, frame_idx, is_init_cond_frame, memories, num_frames, reverse)
        if prev_sam_mask_logits is not None:
            if point_inputs is None or mask_inputs is not None:
                raise ValueError("earlier logits go to the decoder only with new points")
            mask_inputs = prev_sam_mask_logits
        multimask = _use_multimask(model, is_init_cond_frame, point_inputs)
        outs = model.forward_sam_heads(pix, point_inputs, mask_inputs, high_res, multimask)
    _, _, _, low_res, high_res_masks, obj_ptr, scores = outs
    result = FrameOutput(pred_masks=low_res, obj_ptr=obj_ptr, object_score_logits=scores)
    if run_mem_encoder and model.num_maskmem > 0:
        result.maskmem_features = encode_new_memory(model, frame, high_res_masks, scores,
                                                    is_mask_from_pts=point_inputs is not None)
    return result
