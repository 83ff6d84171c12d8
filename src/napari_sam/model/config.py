"""Frozen configurations of the SAM variants, and inference of a configuration from a
state dict in the official key format.

One dataclass per encoder family replaces the near-copy builder functions of the
official code: the numbers that distinguish ``vit_b`` from ``vit_h`` live here and
nowhere else.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Mapping, Union

import torch

IMAGE_SIZE = 1024
"""Side of the square model input in pixels (the longest image side is resized to it)."""

PROMPT_EMBED_DIM = 256
"""Channels of the image embedding and of every prompt token."""

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ViTConfig:
    """Plain ViT image encoder of the SAM paper (``vit_b``, ``vit_l``, ``vit_h``).

    Parameters
    ----------
    embed_dim, depth, num_heads
        Width, number of transformer blocks and attention heads.
    global_attn_indexes
        Blocks that attend over the whole 64x64 token grid; all others attend within
        ``window_size`` x ``window_size`` windows.
    patch_size, window_size, mlp_ratio, out_chans, img_size
        As in the paper: 16, 14, 4, 256 and 1024.
    """

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    out_chans: int = PROMPT_EMBED_DIM
    img_size: int = IMAGE_SIZE

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} lie outside depth {self.depth}")


@dataclass(frozen=True)
class TinyViTConfig:
    """MobileSAM's TinyViT-5M image encoder (``vit_t``).

    Parameters
    ----------
    embed_dims, depths, num_heads, window_sizes
        Per stage; stage 0 is convolutional (MBConv), the others are attention stages.
    mlp_ratio, out_chans, img_size
        4, 256 and 1024 as in MobileSAM.
    """

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    out_chans: int = PROMPT_EMBED_DIM
    img_size: int = IMAGE_SIZE


EncoderConfig = Union[ViTConfig, TinyViTConfig]


@dataclass(frozen=True)
class SamConfig:
    """A whole SAM: an image encoder configuration plus the standard prompt encoder and
    mask decoder, which are the same in every official variant."""

    encoder: EncoderConfig
    name: str = "custom"
    prompt_embed_dim: int = PROMPT_EMBED_DIM
    image_size: int = IMAGE_SIZE
    mask_in_chans: int = 16
    num_multimask_outputs: int = 3
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = field(default=PIXEL_MEAN)
    pixel_std: tuple[float, float, float] = field(default=PIXEL_STD)

    @property
    def embedding_size(self) -> int:
        return self.image_size // 16


CONFIGS: dict[str, SamConfig] = {
    "vit_b": SamConfig(ViTConfig(768, 12, 12, (2, 5, 8, 11)), name="vit_b"),
    "vit_l": SamConfig(ViTConfig(1024, 24, 16, (5, 11, 17, 23)), name="vit_l"),
    "vit_h": SamConfig(ViTConfig(1280, 32, 16, (7, 15, 23, 31)), name="vit_h"),
    "vit_t": SamConfig(TinyViTConfig(), name="vit_t"),
}
"""The official configurations, by the names the official registries use."""


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> SamConfig:
    """Work out the configuration of a SAM from the keys and shapes of its state dict.

    Parameters
    ----------
    state_dict
        Tensors in the official key format (``image_encoder.*``, ``prompt_encoder.*``,
        ``mask_decoder.*``).

    Returns
    -------
    SamConfig
        One of :data:`CONFIGS` where the encoder matches an official variant, otherwise a
        custom configuration.

    Raises
    ------
    ValueError
        If the keys are not those of a SAM image encoder.
    """
    if "image_encoder.patch_embed.seq.0.c.weight" in state_dict:
        stages = sorted(
            {int(m.group(1)) for k in state_dict if (m := re.match(r"image_encoder\.layers\.(\d+)\.", k))}
        )
        if not stages:
            raise ValueError("TinyViT state dict has no image_encoder.layers.* keys")
        dims, depths, heads, windows = [], [], [], []
        for s in stages:
            blocks = {
                int(m.group(1))
                for k in state_dict
                if (m := re.match(rf"image_encoder\.layers\.{s}\.blocks\.(\d+)\.", k))
            }
            depths.append(len(blocks))
            if s == 0:
                dims.append(state_dict["image_encoder.layers.0.blocks.0.conv3.c.weight"].shape[0])
                heads.append(TinyViTConfig().num_heads[0])
                windows.append(TinyViTConfig().window_sizes[0])
                continue
            bias = state_dict[f"image_encoder.layers.{s}.blocks.0.attn.attention_biases"]
            dims.append(state_dict[f"image_encoder.layers.{s}.blocks.0.attn.norm.weight"].shape[0])
            heads.append(bias.shape[0])
            windows.append(round(bias.shape[1] ** 0.5))
        enc: EncoderConfig = TinyViTConfig(tuple(dims), tuple(depths), tuple(heads), tuple(windows))
    elif "image_encoder.patch_embed.proj.weight" in state_dict:
        embed_dim, _, patch, _ = state_dict["image_encoder.patch_embed.proj.weight"].shape
        depth = 1 + max(
            int(m.group(1)) for k in state_dict if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))
        )
        grid = state_dict["image_encoder.pos_embed"].shape[1]
        rel = [state_dict[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape for i in range(depth)]
        head_dim = rel[0][1]
        global_idx = tuple(i for i, s in enumerate(rel) if s[0] == 2 * grid - 1)
        window = next(((s[0] + 1) // 2 for s in rel if s[0] != 2 * grid - 1), 14)
        enc = ViTConfig(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=embed_dim // head_dim,
            global_attn_indexes=global_idx,
            patch_size=patch,
            window_size=window,
            mlp_ratio=state_dict["image_encoder.blocks.0.mlp.lin1.weight"].shape[0] / embed_dim,
            img_size=grid * patch,
        )
    else:
        raise ValueError(
            "not a SAM state dict: found neither image_encoder.patch_embed.proj.weight (ViT) "
            "nor image_encoder.patch_embed.seq.0.c.weight (TinyViT)"
        )
    for _name, cfg in CONFIGS.items():
        if cfg.encoder == enc:
            return cfg
    # The input side is the encoder's: a ViT trained on 256-pixel inputs has 16 x 16 position embeddings.
    return SamConfig(enc, image_size=enc.img_size)


def config_to_dict(config: SamConfig) -> dict:
    """A SamConfig as plain JSON-able data (stored in our checkpoints' metadata)."""

    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    out = plain(dataclasses.asdict(config))
    out["encoder_type"] = type(config.encoder).__name__
    return out


def config_from_dict(data) -> SamConfig:
    """Inverse of :func:`config_to_dict`."""
    data = dict(data)
    kind = data.pop("encoder_type", None)
    enc = dict(data.pop("encoder"))
    enc_cls = TinyViTConfig if (kind == "TinyViTConfig" or "embed_dims" in enc) else ViTConfig
    enc = {k: tuple(v) if isinstance(v, list) else v for k, v in enc.items()}
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return SamConfig(encoder=enc_cls(**enc), **data)
