"""Frozen configurations of SAM 2.1, mirroring the official yaml ``model:`` node.

Every dataclass stands for one node of the official configuration
(``configs/sam2.1/*.yaml``) and its fields carry the official argument names and
defaults, so that a resolved official node converts one-to-one
(:func:`config_from_official`) and the model builder can call each constructor with
the fields as keyword arguments. :data:`CONFIGS` holds the four released sizes with the
settings of the official builders (``build_sam2`` / ``build_sam2_video_predictor``):
dynamic multimask fallback in the mask decoder, binarised click masks for the memory
encoder and hole filling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .plain_data import from_plain, to_plain

__all__ = [
    "CONFIGS", "CXBlockConfig", "FpnNeckConfig", "FuserConfig", "HieraConfig", "ImageEncoderConfig",
    "MaskDecoderExtraArgs", "MaskDownSamplerConfig", "MemoryAttentionConfig", "MemoryAttentionLayerConfig",
    "MemoryEncoderConfig", "PositionEmbeddingSineConfig", "RoPEAttentionConfig", "Sam2Config",
    "config_from_dict", "config_from_official", "config_to_dict",
]

PIXEL_MEAN = (0.485, 0.456, 0.406)
"""ImageNet mean of RGB values scaled to [0, 1] (SAM 2 normalises after dividing by 255)."""
PIXEL_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PositionEmbeddingSineConfig:
    """Sine positional encoding of a feature map (``PositionEmbeddingSine``): ``num_pos_feats``
    output channels, half for y and half for x."""

    num_pos_feats: int
    temperature: float = 10000
    normalize: bool = True
    scale: Optional[float] = None

    def __post_init__(self):
        if self.num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, not {self.num_pos_feats}")
        if self.scale is not None and not self.normalize:
            raise ValueError("a scale of the sine positional encoding needs normalize=True")


@dataclass(frozen=True)
class HieraConfig:
    """The Hiera trunk: stages of multi-scale blocks, each stage halving the resolution
    (query pooling) and doubling width and heads.

    Parameters
    ----------
    embed_dim, num_heads
        Width and heads of the first stage.
    stages
        Blocks per stage.
    global_att_blocks
        Blocks (numbered over all stages) that attend globally; the others attend within
        windows of ``window_spec[stage]`` tokens a side.
    window_pos_embed_bkg_spatial_size
        Grid of the background position embedding, interpolated to the token grid.
    q_pool, q_stride, dim_mul, head_mul
        Number of pooled stage transitions, pooling stride, width and head factors.
    """

    embed_dim: int = 96
    num_heads: int = 1
    stages: tuple[int, ...] = (2, 3, 16, 3)
    global_att_blocks: tuple[int, ...] = (12, 16, 20)
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14)
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    q_pool: int = 3
    q_stride: tuple[int, int] = (2, 2)
    dim_mul: float = 2.0
    head_mul: float = 2.0
    drop_path_rate: float = 0.0
    return_interm_layers: bool = True

    def __post_init__(self):
        if len(self.stages) != len(self.window_spec):
            raise ValueError(f"window_spec {self.window_spec} needs one size per stage {self.stages}")
        if not 0 <= self.q_pool < len(self.stages):
            raise ValueError(f"q_pool {self.q_pool} must lie in [0, {len(self.stages) - 1}]")
        bad = [i for i in self.global_att_blocks if not 0 <= i < sum(self.stages)]
        if bad:
            raise ValueError(f"global_att_blocks {bad} lie outside the {sum(self.stages)} blocks")

    @property
    def stage_ends(self) -> tuple[int, ...]:
        """Index of the last block of every stage."""
        return tuple(sum(self.stages[: i + 1]) - 1 for i in range(len(self.stages)))

    @property
    def channel_list(self) -> tuple[int, ...]:
        """Output channels of the stages, lowest resolution first (as the neck lists them)."""
        dims = [int(self.embed_dim * self.dim_mul**i) for i in range(len(self.stages))]
        return tuple(dims[::-1]) if self.return_interm_layers else (dims[-1],)


@dataclass(frozen=True)
class FpnNeckConfig:
    """The feature-pyramid neck: a 1x1 convolution per level to ``d_model`` channels, with
    top-down fusion into ``fpn_top_down_levels`` only."""

    position_encoding: PositionEmbeddingSineConfig
    d_model: int
    backbone_channel_list: tuple[int, ...]
    kernel_size: int = 1
    stride: int = 1
    padding: int = 0
    fpn_interp_model: str = "bilinear"
    fuse_type: str = "sum"
    fpn_top_down_levels: Optional[tuple[int, ...]] = None

    def __post_init__(self):
        if self.fuse_type not in ("sum", "avg"):
            raise ValueError(f"fuse_type must be 'sum' or 'avg', not {self.fuse_type!r}")


@dataclass(frozen=True)
class ImageEncoderConfig:
    """Trunk and neck; ``scalp`` drops that many of the lowest-resolution levels."""

    trunk: HieraConfig
    neck: FpnNeckConfig
    scalp: int = 0

    def __post_init__(self):
        if tuple(self.trunk.channel_list) != tuple(self.neck.backbone_channel_list):
            raise ValueError(
                f"the neck's backbone_channel_list {tuple(self.neck.backbone_channel_list)} does not match "
                f"the trunk's channels {self.trunk.channel_list}"
            )


@dataclass(frozen=True)
class RoPEAttentionConfig:
    """Attention with 2D rotary position encoding (memory attention)."""

    embedding_dim: int
    num_heads: int
    downsample_rate: int = 1
    dropout: float = 0.0
    kv_in_dim: Optional[int] = None
    rope_theta: float = 10000.0
    rope_k_repeat: bool = False
    feat_sizes: tuple[int, int] = (64, 64)


@dataclass(frozen=True)
class MemoryAttentionLayerConfig:
    """One memory-attention layer: RoPE self-attention, RoPE cross-attention to the memory,
    feed-forward."""

    activation: str
    cross_attention: RoPEAttentionConfig
    d_model: int
    dim_feedforward: int
    dropout: float
    pos_enc_at_attn: bool
    pos_enc_at_cross_attn_keys: bool
    pos_enc_at_cross_attn_queries: bool
    self_attention: RoPEAttentionConfig


@dataclass(frozen=True)
class MemoryAttentionConfig:
    d_model: int
    pos_enc_at_input: bool
    layer: MemoryAttentionLayerConfig
    num_layers: int
    batch_first: bool = True


@dataclass(frozen=True)
class MaskDownSamplerConfig:
    embed_dim: int = 256
    kernel_size: int = 4
    stride: int = 4
    padding: int = 0
    total_stride: int = 16


@dataclass(frozen=True)
class CXBlockConfig:
    """A ConvNeXt block of the memory encoder's fuser."""

    dim: int
    kernel_size: int = 7
    padding: int = 3
    drop_path: float = 0.0
    layer_scale_init_value: float = 1e-6
    use_dwconv: bool = True


@dataclass(frozen=True)
class FuserConfig:
    layer: CXBlockConfig
    num_layers: int
    dim: Optional[int] = None
    input_projection: bool = False


@dataclass(frozen=True)
class MemoryEncoderConfig:
    out_dim: int
    mask_downsampler: MaskDownSamplerConfig
    fuser: FuserConfig
    position_encoding: PositionEmbeddingSineConfig
    in_dim: int = 256


@dataclass(frozen=True)
class MaskDecoderExtraArgs:
    """``sam_mask_decoder_extra_args``: when one mask is asked for and the single-mask output
    is unstable (IoU of its masks at +-delta below ``thresh``), fall back to the best of the
    three multimask outputs."""

    dynamic_multimask_via_stability: bool = False
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98


@dataclass(frozen=True)
class Sam2Config:
    """A whole SAM 2: the official ``SAM2Base`` arguments (names and defaults as there), the
    video predictor's own ones, and a name.

    The sub-configurations hold the image encoder (Hiera + FPN neck), the memory attention
    and the memory encoder; the prompt encoder and mask decoder follow from
    ``image_size``, ``backbone_stride`` and the neck's ``d_model``, as in the official code.
    """

    image_encoder: ImageEncoderConfig
    memory_attention: MemoryAttentionConfig
    memory_encoder: MemoryEncoderConfig
    name: str = "custom"
    num_maskmem: int = 7
    image_size: int = 512
    backbone_stride: int = 16
    sigmoid_scale_for_mem_enc: float = 1.0
    sigmoid_bias_for_mem_enc: float = 0.0
    binarize_mask_from_pts_for_mem_enc: bool = False
    use_mask_input_as_output_without_sam: bool = False
    max_cond_frames_in_attn: int = -1
    directly_add_no_mem_embed: bool = False
    use_high_res_features_in_sam: bool = False
    multimask_output_in_sam: bool = False
    multimask_min_pt_num: int = 1
    multimask_max_pt_num: int = 1
    multimask_output_for_tracking: bool = False
    use_multimask_token_for_obj_ptr: bool = False
    iou_prediction_use_sigmoid: bool = False
    memory_temporal_stride_for_eval: int = 1
    non_overlap_masks_for_mem_enc: bool = False
    use_obj_ptrs_in_encoder: bool = False
    max_obj_ptrs_in_encoder: int = 16
    add_tpos_enc_to_obj_ptrs: bool = True
    proj_tpos_enc_in_obj_ptrs: bool = False
    use_signed_tpos_enc_to_obj_ptrs: bool = False
    only_obj_ptrs_in_the_past_for_eval: bool = False
    pred_obj_scores: bool = False
    pred_obj_scores_mlp: bool = False
    fixed_no_obj_ptr: bool = False
    soft_no_obj_ptr: bool = False
    use_mlp_for_obj_ptr_proj: bool = False
    no_obj_embed_spatial: bool = False
    sam_mask_decoder_extra_args: Optional[MaskDecoderExtraArgs] = None
    compile_image_encoder: bool = False
    # SAM2VideoPredictor's own arguments
    fill_hole_area: int = 0
    non_overlap_masks: bool = False
    clear_non_cond_mem_around_input: bool = False
    add_all_frames_to_correct_as_cond: bool = False
    pixel_mean: tuple[float, float, float] = field(default=PIXEL_MEAN)
    pixel_std: tuple[float, float, float] = field(default=PIXEL_STD)

    def __post_init__(self):
        if self.proj_tpos_enc_in_obj_ptrs and not self.add_tpos_enc_to_obj_ptrs:
            raise ValueError("proj_tpos_enc_in_obj_ptrs needs add_tpos_enc_to_obj_ptrs")
        if self.fixed_no_obj_ptr and not (self.pred_obj_scores and self.use_obj_ptrs_in_encoder):
            raise ValueError("fixed_no_obj_ptr needs pred_obj_scores and use_obj_ptrs_in_encoder")
        if self.image_size % self.backbone_stride:
            raise ValueError(f"image_size {self.image_size} is not a multiple of backbone_stride "
                             f"{self.backbone_stride}")

    @property
    def hidden_dim(self) -> int:
        """Channels of the image features and prompt tokens (the neck's ``d_model``)."""
        return self.image_encoder.neck.d_model

    @property
    def embedding_size(self) -> int:
        """Side of the lowest-resolution feature grid the mask decoder sees (64 at 1024)."""
        return self.image_size // self.backbone_stride

    @property
    def decoder_extra(self) -> MaskDecoderExtraArgs:
        return self.sam_mask_decoder_extra_args or MaskDecoderExtraArgs()


def _official(name: str, embed_dim: int, num_heads: int, stages: tuple[int, ...],
              global_att_blocks: tuple[int, ...], **trunk: Any) -> Sam2Config:
    """One of the four released SAM 2.1 sizes; everything but the trunk is shared."""
    sine = PositionEmbeddingSineConfig
    rope: dict[str, Any] = dict(embedding_dim=256, num_heads=1, downsample_rate=1, dropout=0.1, rope_theta=10000.0,
                                feat_sizes=(64, 64))
    hiera = HieraConfig(embed_dim=embed_dim, num_heads=num_heads, stages=stages,
                        global_att_blocks=global_att_blocks, **trunk)
    return Sam2Config(
        name=name,
        image_encoder=ImageEncoderConfig(
            trunk=hiera,
            neck=FpnNeckConfig(sine(256), 256, hiera.channel_list, fpn_interp_model="nearest",
                               fpn_top_down_levels=(2, 3)),
            scalp=1,
        ),
        memory_attention=MemoryAttentionConfig(
            d_model=256, pos_enc_at_input=True, num_layers=4,
            layer=MemoryAttentionLayerConfig(
                activation="relu", d_model=256, dim_feedforward=2048, dropout=0.1, pos_enc_at_attn=False,
                pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False,
                self_attention=RoPEAttentionConfig(**rope),
                cross_attention=RoPEAttentionConfig(**rope, rope_k_repeat=True, kv_in_dim=64),
            ),
        ),
        memory_encoder=MemoryEncoderConfig(
            out_dim=64, position_encoding=sine(64),
            mask_downsampler=MaskDownSamplerConfig(kernel_size=3, stride=2, padding=1),
            fuser=FuserConfig(CXBlockConfig(dim=256, kernel_size=7, padding=3), num_layers=2),
        ),
        num_maskmem=7, image_size=1024, sigmoid_scale_for_mem_enc=20.0, sigmoid_bias_for_mem_enc=-10.0,
        use_mask_input_as_output_without_sam=True, directly_add_no_mem_embed=True, no_obj_embed_spatial=True,
        use_high_res_features_in_sam=True, multimask_output_in_sam=True, iou_prediction_use_sigmoid=True,
        use_obj_ptrs_in_encoder=True, add_tpos_enc_to_obj_ptrs=True, proj_tpos_enc_in_obj_ptrs=True,
        use_signed_tpos_enc_to_obj_ptrs=True, only_obj_ptrs_in_the_past_for_eval=True, pred_obj_scores=True,
        pred_obj_scores_mlp=True, fixed_no_obj_ptr=True, multimask_output_for_tracking=True,
        use_multimask_token_for_obj_ptr=True, multimask_min_pt_num=0, multimask_max_pt_num=1,
        use_mlp_for_obj_ptr_proj=True,
        # what build_sam2 / build_sam2_video_predictor add to the yaml by default
        sam_mask_decoder_extra_args=MaskDecoderExtraArgs(True, 0.05, 0.98),
        binarize_mask_from_pts_for_mem_enc=True, fill_hole_area=8,
    )


CONFIGS: dict[str, Sam2Config] = {
    "sam2.1_hiera_tiny": _official("sam2.1_hiera_tiny", 96, 1, (1, 2, 7, 2), (5, 7, 9),
                                   window_pos_embed_bkg_spatial_size=(7, 7)),
    "sam2.1_hiera_small": _official("sam2.1_hiera_small", 96, 1, (1, 2, 11, 2), (7, 10, 13),
                                    window_pos_embed_bkg_spatial_size=(7, 7)),
    "sam2.1_hiera_base_plus": _official("sam2.1_hiera_base_plus", 112, 2, (2, 3, 16, 3), (12, 16, 20)),
    "sam2.1_hiera_large": _official("sam2.1_hiera_large", 144, 2, (2, 6, 36, 4), (23, 33, 43),
                                    window_pos_embed_bkg_spatial_size=(7, 7), window_spec=(8, 4, 16, 8)),
}
"""The released SAM 2.1 sizes (``configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml``) with the
official builders' post-processing settings, by checkpoint name."""


def config_from_official(node: Mapping[str, Any], name: str = "custom") -> Sam2Config:
    """Convert a resolved official ``model:`` node (the yaml as plain dicts and lists,
    ``_target_`` keys allowed and ignored) into a :class:`Sam2Config`.

    Parameters
    ----------
    node
        The official node, e.g. ``OmegaConf.to_container(cfg.model, resolve=True)``; keys
        that the official builders add (``sam_mask_decoder_extra_args``,
        ``binarize_mask_from_pts_for_mem_enc``, ``fill_hole_area`` ...) are understood.
    name
        Name of the result when ``node`` has none.

    Raises
    ------
    ValueError
        Naming the first unknown key or missing argument, with its path in the node.
    """
    data = dict(node)
    data.setdefault("name", name)
    return from_plain(Sam2Config, data, "model")


def config_to_dict(config: Sam2Config) -> dict[str, Any]:
    """A configuration as plain JSON data (lists for tuples), for checkpoint metadata."""
    return to_plain(config)


def config_from_dict(data: Mapping[str, Any]) -> Sam2Config:
    """Inverse of :func:`config_to_dict`."""
    return from_plain(Sam2Config, data, "config")
