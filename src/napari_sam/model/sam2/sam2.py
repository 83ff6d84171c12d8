"""The composed SAM 2 model (official ``SAM2Base`` parameter names), its builder and
strict loading of official checkpoints.

:class:`Sam2` holds every top-level submodule and parameter of the official model, so
that ``load_state_dict(torch.load(ckpt)["model"], strict=True)`` works for the released
checkpoints, and the image-side steps of ``SAM2Base`` with the same meaning:
:meth:`Sam2.forward_image`, :meth:`Sam2.prepare_backbone_features`,
:meth:`Sam2.forward_sam_heads` and :meth:`Sam2.use_mask_as_output`. The video side
(memory-conditioned features, tracking) is in :mod:`.tracking`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError, ModelSource, check_state_dict
from ..mask_decoder import MLP
from ..prompt_encoder import PromptEncoder
from .config import CONFIGS, MemoryAttentionConfig, MemoryEncoderConfig, Sam2Config
from .image_encoder import ImageEncoder, PositionEmbeddingSine
from .mask_decoder import Sam2MaskDecoder
from .memory_attention import MemoryAttention, MemoryAttentionLayer, RoPEAttention
from .memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder

NO_OBJ_SCORE = -1024.0
"""Logit given to every pixel of a mask whose object the model says is absent."""

SamHeadsOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _fields(config: Any, **override: Any) -> dict[str, Any]:
    """A config dataclass's fields as keyword arguments (shallow), with replacements."""
    return {**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)}, **override}


def _memory_attention(c: MemoryAttentionConfig) -> MemoryAttention:
    layer = c.layer
    return MemoryAttention(**_fields(c, layer=MemoryAttentionLayer(**_fields(
        layer,
        self_attention=RoPEAttention(**_fields(layer.self_attention)),
        cross_attention=RoPEAttention(**_fields(layer.cross_attention)),
    ))))


def _memory_encoder(c: MemoryEncoderConfig) -> MemoryEncoder:
    return MemoryEncoder(**_fields(
        c,
        mask_downsampler=MaskDownSampler(**_fields(c.mask_downsampler)),
        fuser=Fuser(**_fields(c.fuser, layer=CXBlock(**_fields(c.fuser.layer)))),
        position_encoding=PositionEmbeddingSine(**_fields(c.position_encoding)),
    ))


class Sam2(nn.Module):
    """SAM 2: Hiera image encoder, prompt encoder, mask decoder, memory attention and
    memory encoder, under the official parameter names.

    Parameters
    ----------
    config
        The variant and every ``SAM2Base`` setting; see :class:`~.config.Sam2Config`.

    Notes
    -----
    The official settings are read from :attr:`config` (``model.config.num_maskmem`` ...).
    Sizes derived from them are attributes, as in ``SAM2Base``: :attr:`hidden_dim`,
    :attr:`mem_dim`, :attr:`image_size`, :attr:`num_feature_levels`,
    :attr:`sam_image_embedding_size`. Use :func:`build_sam2` to construct one and
    :func:`sam2_from_state_dict` to load weights.
    """

    def __init__(self, config: Sam2Config):
        super().__init__()
        c = config
        self.config = config
        self.source: ModelSource | None = None
        """Where the weights came from (set by the loader); None for a model built in memory."""
        self.image_encoder = ImageEncoder(c.image_encoder)
        self.hidden_dim = c.hidden_dim
        self.image_size = c.image_size
        self.num_feature_levels = 3 if c.use_high_res_features_in_sam else 1
        if c.use_obj_ptrs_in_encoder:
            # the mask prompt of a mask-only frame down to stride 4, scaled to logits
            self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.memory_attention = _memory_attention(c.memory_attention)
        self.memory_encoder = _memory_encoder(c.memory_encoder)
        # the memory's width: the encoder's output projection's, if it has one
        self.mem_dim = c.memory_encoder.out_dim if c.memory_encoder.out_dim != c.memory_encoder.in_dim else c.hidden_dim
        self.num_maskmem = c.num_maskmem
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(c.num_maskmem, 1, 1, self.mem_dim))
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, self.hidden_dim))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, self.hidden_dim))
        if c.pred_obj_scores and c.use_obj_ptrs_in_encoder:
            self.no_obj_ptr = nn.Parameter(torch.zeros(1, self.hidden_dim))
        if c.no_obj_embed_spatial:
            self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, self.mem_dim))
        for name in ("maskmem_tpos_enc", "no_mem_embed", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial"):
            if hasattr(self, name) and not getattr(self, name).is_meta:
                nn.init.trunc_normal_(getattr(self, name), std=0.02)

        self.sam_prompt_embed_dim = self.hidden_dim
        self.sam_image_embedding_size = c.embedding_size
        grid = c.embedding_size
        self.sam_prompt_encoder = PromptEncoder(self.hidden_dim, (grid, grid), (c.image_size, c.image_size), 16,
                                                corner_labels=True)
        self.sam_mask_decoder = Sam2MaskDecoder(
            self.hidden_dim,
            use_high_res_features=c.use_high_res_features_in_sam,
            iou_prediction_use_sigmoid=c.iou_prediction_use_sigmoid,
            pred_obj_scores=c.pred_obj_scores,
            pred_obj_scores_mlp=c.pred_obj_scores_mlp,
            use_multimask_token_for_obj_ptr=c.use_multimask_token_for_obj_ptr,
            extra=c.sam_mask_decoder_extra_args,
        )
        self.obj_ptr_proj: nn.Module = nn.Identity()
        if c.use_obj_ptrs_in_encoder:
            self.obj_ptr_proj = (MLP(self.hidden_dim, self.hidden_dim, self.hidden_dim, 3)
                                 if c.use_mlp_for_obj_ptr_proj else nn.Linear(self.hidden_dim, self.hidden_dim))
        self.obj_ptr_tpos_proj: nn.Module = (nn.Linear(self.hidden_dim, self.mem_dim)
                                             if c.proj_tpos_enc_in_obj_ptrs else nn.Identity())

    @property
    def device(self) -> torch.device:
        return self.no_mem_embed.device

    def forward_image(self, img_batch: torch.Tensor) -> dict[str, Any]:
        """Image features of a normalised batch (B, 3, S, S) (see :mod:`.image_predictor`).

        Returns
        -------
        dict
            ``backbone_fpn``: [(B, C, S/4, S/4), (B, C, S/8, S/8), (B, C, S/16, S/16)] with C the
            hidden width, where the first two have already been through the decoder's
            ``conv_s0``/``conv_s1`` (C/8 and C/4 channels) when the model uses high-resolution
            features; ``vision_pos_enc``: the position encodings of those levels (C channels);
            ``vision_features``: the stride-16 level.
        """
        project = None
        if self.config.use_high_res_features_in_sam:
            # once per image here rather than on every click; the neck merges each with
            # its level's lateral convolution where it can
            project = [self.sam_mask_decoder.conv_s0, self.sam_mask_decoder.conv_s1]
        return self.image_encoder(img_batch, project)

    def prepare_backbone_features(
        self, backbone_out: Mapping[str, Any]
    ) -> tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
        """The last :attr:`num_feature_levels` levels of :meth:`forward_image`'s output as
        token sequences.

        Returns
        -------
        backbone_out : a shallow copy of the input
        vision_feats : list of (h_i * w_i, B, C_i), highest resolution first
        vision_pos_embeds : list of (h_i * w_i, B, C)
        feat_sizes : list of (h_i, w_i)
        """
        out = dict(backbone_out)
        levels = self.num_feature_levels
        fpn, pos = out["backbone_fpn"], out["vision_pos_enc"]
        if len(fpn) != len(pos) or len(fpn) < levels:
            raise ValueError(f"backbone output has {len(fpn)} feature and {len(pos)} position levels, "
                             f"the model needs {levels}")
        maps, pos = fpn[-levels:], pos[-levels:]
        feat_sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in pos]
        feats = [x.flatten(2).permute(2, 0, 1) for x in maps]
        pos_embeds = [x.flatten(2).permute(2, 0, 1) for x in pos]
        return out, feats, pos_embeds, feat_sizes

    def forward_sam_heads(
        self,
        backbone_features: torch.Tensor,
        point_inputs: Mapping[str, torch.Tensor] | None = None,
        mask_inputs: torch.Tensor | None = None,
        high_res_features: list[torch.Tensor] | None = None,
        multimask_output: bool = False,
    ) -> SamHeadsOutput:
        """Prompt encoder and mask decoder on B objects (official ``_forward_sam_heads``).

        Parameters
        ----------
        backbone_features
            (B, C, S/16, S/16) image features (memory-conditioned, or with ``no_mem_embed``).
        point_inputs
            ``{"point_coords": (B, P, 2) as (x, y) in the S x S model-input frame,
            "point_labels": (B, P)}`` with 1 foreground, 0 background, 2/3 box corners,
            -1 padding; None gives one padding point.
        mask_inputs
            (B, 1, H, W) mask prompt (float or bool), resized to the decoder's mask input
            (S/4 x S/4) with antialiasing when its size differs.
        high_res_features
            [(B, C/8, S/4, S/4), (B, C/4, S/8, S/8)] from :meth:`forward_image`.
        multimask_output
            Three candidate masks instead of one.

        Returns
        -------
        low_res_multimasks : (B, M, S/4, S/4) logits, M = 3 or 1
        high_res_multimasks : (B, M, S, S) logits
        ious : (B, M)
        low_res_masks : (B, 1, S/4, S/4) the mask with the highest predicted IoU
        high_res_masks : (B, 1, S, S)
        obj_ptr : (B, C) object pointer
        object_score_logits : (B, 1)
        """
        B, device, enc = backbone_features.shape[0], backbone_features.device, self.sam_prompt_encoder
        want = (self.sam_prompt_embed_dim, self.sam_image_embedding_size, self.sam_image_embedding_size)
        if tuple(backbone_features.shape[1:]) != want:
            raise ValueError(f"backbone_features must be (B, *{want}), not {tuple(backbone_features.shape)}")
        if point_inputs is not None:
            coords, labels = point_inputs["point_coords"], point_inputs["point_labels"]
            if coords.shape[0] != B or labels.shape[0] != B:
                raise ValueError(f"point inputs for {coords.shape[0]} objects, features for {B}")
        else:
            coords = torch.zeros(B, 1, 2, device=device)
            labels = -torch.ones(B, 1, dtype=torch.int32, device=device)
        mask_prompt = None
        if mask_inputs is not None:
            if mask_inputs.ndim != 4 or tuple(mask_inputs.shape[:2]) != (B, 1):
                raise ValueError(f"mask_inputs must be (B={B}, 1, H, W), not {tuple(mask_inputs.shape)}")
            mask_prompt = mask_inputs
            if tuple(mask_inputs.shape[-2:]) != tuple(enc.mask_input_size):
                mask_prompt = F.interpolate(mask_inputs.float(), size=enc.mask_input_size, mode="bilinear",
                                            align_corners=False, antialias=True)
        sparse, dense = enc((coords, labels), None, mask_prompt)
        low_res_multimasks, ious, tokens, object_score_logits = self.sam_mask_decoder.predict(
            backbone_features, enc.get_dense_pe(), sparse,
            enc.no_mask_dense() if dense is None else dense, multimask_output, high_res_features,
        )
        is_obj = object_score_logits > 0
        if self.config.pred_obj_scores:
            # a hard choice, as the masks the memory is built from
            low_res_multimasks = torch.where(is_obj[:, None, None], low_res_multimasks, NO_OBJ_SCORE)
        low_res_multimasks = low_res_multimasks.float()
        high_res_multimasks = F.interpolate(low_res_multimasks, size=(self.image_size, self.image_size),
                                            mode="bilinear", align_corners=False)
        token = tokens[:, 0]
        if multimask_output:
            best, rows = ious.argmax(dim=-1), torch.arange(B, device=device)
            low_res_masks = low_res_multimasks[rows, best].unsqueeze(1)
            high_res_masks = high_res_multimasks[rows, best].unsqueeze(1)
            if tokens.shape[1] > 1:
                token = tokens[rows, best]
        else:
            low_res_masks, high_res_masks = low_res_multimasks, high_res_multimasks
        obj_ptr = self.obj_ptr_proj(token)
        if self.config.pred_obj_scores:
            presence = object_score_logits.sigmoid() if self.config.soft_no_obj_ptr else is_obj.float()
            obj_ptr = self._blend_no_obj_ptr(obj_ptr, presence)
        return (low_res_multimasks, high_res_multimasks, ious, low_res_masks, high_res_masks, obj_ptr,
                object_score_logits)

    def _blend_no_obj_ptr(self, obj_ptr: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
        """Mix the learned "no object" pointer in where ``presence`` (B, 1) is below one."""
        if self.config.fixed_no_obj_ptr:
            obj_ptr = presence * obj_ptr
        # (no_obj_ptr exists with pred_obj_scores and use_obj_ptrs_in_encoder, as officially)
        return obj_ptr + (1 - presence) * self.no_obj_ptr

    def use_mask_as_output(
        self,
        backbone_features: torch.Tensor,
        high_res_features: list[torch.Tensor] | None,
        mask_inputs: torch.Tensor,
    ) -> SamHeadsOutput:
        """A given mask (B, 1, S, S) (bool or float) as the output, without the decoder
        (official ``_use_mask_as_output``): logits +10 inside, -10 outside, IoU 1, and the
        object pointer from the decoder run on the downsampled mask. Same outputs as
        :meth:`forward_sam_heads` with M = 1."""
        out_scale, out_bias = 20.0, -10.0
        mask = mask_inputs.float()
        high_res_masks = mask * out_scale + out_bias
        h, w = high_res_masks.shape[-2:]
        low_res_masks = F.interpolate(high_res_masks, size=(h // 4, w // 4), mode="bilinear", align_corners=False,
                                      antialias=True)
        ious = mask.new_ones(mask.shape[0], 1)
        if not self.config.use_obj_ptrs_in_encoder:
            obj_ptr = torch.zeros(mask.shape[0], self.hidden_dim, device=mask.device)
        else:
            obj_ptr = self.forward_sam_heads(backbone_features, mask_inputs=self.mask_downsample(mask),
                                             high_res_features=high_res_features)[5]
        # the mask, not the decoder's score, says whether the object is there
        presence = (mask.flatten(1) > 0).any(dim=1, keepdim=True).float()
        object_score_logits = out_scale * presence + out_bias
        if self.config.pred_obj_scores:
            obj_ptr = self._blend_no_obj_ptr(obj_ptr, presence)
        return low_res_masks, high_res_masks, ious, low_res_masks, high_res_masks, obj_ptr, object_score_logits


def build_sam2(config: Sam2Config | str) -> Sam2:
    """Construct an (untrained) SAM 2 in evaluation mode.

    Parameters
    ----------
    config
        A :class:`~.config.Sam2Config` or a name in :data:`~.config.CONFIGS`. Build under
        ``torch.device("meta")`` to get the structure without allocating weights.
    """
    return Sam2(_resolve(config)).eval()


def _resolve(config: Sam2Config | str) -> Sam2Config:
    if isinstance(config, Sam2Config):
        return config
    if config not in CONFIGS:
        raise ValueError(f"unknown SAM 2 configuration {config!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[config]


_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


def expected_shapes(config: Sam2Config | str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict of a configuration (built on the meta device)."""
    name = config if isinstance(config, str) else None
    if name is not None and name in _SHAPES:
        return _SHAPES[name]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_sam2(config).state_dict().items()}
    if name is not None:
        _SHAPES[name] = shapes
    return shapes


def _unwrap(state: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    """The state dict of an official checkpoint ``{"model": state_dict}``, or ``state``."""
    return state["model"] if isinstance(state.get("model"), Mapping) else state


def infer_sam2_config(state: Mapping[str, Any]) -> Sam2Config:
    """The released SAM 2.1 size whose keys and shapes ``state`` has exactly.

    Parameters
    ----------
    state
        An official checkpoint ``{"model": state_dict}`` or its state dict.

    Raises
    ------
    CheckpointError
        When no size fits (naming the trunk's width and depth): other models need their
        configuration.
    """
    sd = _unwrap(state)
    got = {k: tuple(v.shape) for k, v in sd.items()}
    for name in CONFIGS:
        if expected_shapes(name) == got:
            return CONFIGS[name]
    width = got.get("image_encoder.trunk.patch_embed.proj.weight", ("?",))[0]
    depth = len({k.split(".")[3] for k in got if k.startswith("image_encoder.trunk.blocks.")})
    raise CheckpointError(
        f"the state dict (Hiera width {width}, {depth} blocks, {len(got)} tensors) fits none of the SAM 2.1 "
        f"sizes {sorted(CONFIGS)}; record its configuration in the checkpoint's metadata (write_checkpoint(..., "
        f"metadata={{'config': config_to_dict(config)}})) or pass config= to the loader"
    )


def sam2_from_state_dict(
    state: Mapping[str, Any],
    config: Sam2Config | str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Sam2:
    """Build a SAM 2 and load official weights into it strictly.

    Parameters
    ----------
    state
        An official checkpoint ``{"model": state_dict}`` (as ``torch.load(path,
        weights_only=True)`` returns it) or the state dict itself.
    config
        The variant (or its name); inferred from the keys and shapes when None.
    device, dtype
        Where the weights go; ``dtype`` applies to floating-point tensors.

    Raises
    ------
    CheckpointError
        One line naming the missing and unexpected keys and the shape mismatches.
    """
    sd = _unwrap(state)
    config = _resolve(infer_sam2_config(sd) if config is None else config)
    with torch.device("meta"):
        model = build_sam2(config)
    check_state_dict(model.state_dict(), sd, what=f"the SAM 2 model {config.name!r}")
    model.load_state_dict(sd, strict=True, assign=True)
    for module in model.modules():
        init = getattr(module, "init_non_persistent_buffers", None)
        if init is not None:
            init()
        stale = [n for n, v in vars(module).items() if isinstance(v, torch.Tensor) and v.is_meta]
        stale += [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if stale:
            raise CheckpointError(f"{type(module).__name__}.{stale[0]} is neither in the checkpoint nor rebuilt")
    return model.to(device=device, dtype=dtype).eval()
