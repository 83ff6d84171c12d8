"""micro-sam's instance segmentation decoder: per-pixel foreground and normalised distances
to the object's centre and boundary, from SAM's image embedding.

micro-sam's light-microscopy and EM checkpoints (``vit_b_lm``, ``vit_l_lm``, ...) carry it
as ``decoder_state``: torch-em's UNETR's convolutional half, trained on SAM's image
encoder. It reads only the encoder's output, so it runs on cached embeddings. Its path,
for ``h x w`` tokens (64 x 64 for a 1024 input) and ``f`` initial features (64 in theirs):

- four up-blocks ``deconv1..4`` turn the embedding into feature maps at 2, 4, 8 and 16
  times its resolution (8f, 4f, 2f and f channels);
- ``base`` (8f channels at 1x) climbs three levels of ``decoder``: each doubles the
  resolution, halves the channels and merges the central half of the channels of the
  up-block at that resolution (torch-em crops skips to the centre, channels included);
- ``deconv_out`` doubles once more, ``decoder_head`` merges ``deconv4``'s maps at 16x, a
  1x1 ``out_conv`` gives the three channels and a sigmoid puts them in [0, 1];
- :meth:`InstanceDecoder.resize` brings the maps from the model input frame to the image:
  to the square input side, cropped to the resized image, resized to the original size.

The default model's decoder adds an :class:`~napari_sam.model.image_refiner.ImageRefiner`
(keys ``refine.``) that corrects the logits from the model input's pixels.

Parameter names are those of torch-em's ``UNETR`` without its ``encoder.`` keys, so a
``decoder_state`` loads with ``load_state_dict(strict=True)``. Older checkpoints upsample
with transposed convolutions, newer ones with bilinear interpolation and a 1x1
convolution; :func:`infer_decoder_config` tells them apart by their keys, as micro-sam does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .checkpoint import CheckpointError, check_state_dict
from .image_refiner import DEPTH, ImageRefiner

__all__ = ["InstanceDecoder", "InstanceDecoderConfig", "infer_decoder_config", "instance_decoder_from_state_dict"]

UPSCALE = 16
"""The decoder's maps have this many pixels per embedding token along each side."""

CHANNELS = ("foreground", "center_distances", "boundary_distances")
"""What the three output channels of micro-sam's decoders hold, in order."""


@dataclass(frozen=True)
class InstanceDecoderConfig:
    """Shape of an instance decoder, as far as its state dict fixes it.

    Parameters
    ----------
    embed_dim
        Channels of the image embedding it reads (256 for every SAM encoder).
    initial_features
        Channels of its finest level ``f``; its levels have 8f, 4f, 2f and f channels
        (64 in micro-sam's checkpoints).
    out_channels
        Output maps (3: foreground, centre distances, boundary distances).
    transposed
        Whether it upsamples with 2x2 transposed convolutions (micro-sam's checkpoints
        trained before mid 2025) instead of bilinear interpolation and a 1x1 convolution.
    scale
        Pixels per embedding token of the decoder's own output: 16 (micro-sam's, the model
        input's resolution), or ours, 8 or 4: the decoder stops that many levels early
        (without ``deconv4``/``deconv_out``, and for 4 also without ``deconv3`` and the
        last level; ``decoder_head`` reads the last level alone) and its logits are
        enlarged bilinearly (the finest levels cost most of the time on a CPU; the
        default model's decoder uses 4, the resolution of SAM's mask logits).
    refine_width, refine_depth
        Hidden channels and 3x3 layers of an :class:`~napari_sam.model.image_refiner.ImageRefiner`
        (the default model's); width 0 for none (micro-sam's decoders).
    """

    embed_dim: int = 256
    initial_features: int = 64
    out_channels: int = 3
    transposed: bool = False
    scale: int = UPSCALE
    refine_width: int = 0
    refine_depth: int = DEPTH

    def __post_init__(self):
        for name in ("embed_dim", "initial_features", "out_channels", "refine_width", "refine_depth"):
            if int(getattr(self, name)) < (least := {"refine_width": 0, "refine_depth": 2}.get(name, 1)):
                raise ValueError(f"instance decoder {name} must be at least {least}, not {getattr(self, name)}")
        if self.scale not in (4, 8, 16):
            raise ValueError(f"instance decoder scale must be 4, 8 or 16 pixels per token, not {self.scale}")

    @property
    def levels(self) -> int:
        """Upsampling levels of the decoder path (3 in micro-sam's)."""
        return {16: 3, 8: 3, 4: 2}[self.scale]

    @property
    def features(self) -> tuple[int, int, int, int]:
        """Channels of the levels from coarsest (the embedding's resolution times 2) to finest."""
        f = self.initial_features
        return (8 * f, 4 * f, 2 * f, f)


def infer_decoder_config(state_dict: Mapping[str, torch.Tensor]) -> InstanceDecoderConfig:
    """The configuration of an instance decoder, read from its state dict's shapes and keys.

    Raises
    ------
    CheckpointError
        Naming the key that the configuration is read from, when it is missing or has a
        shape no decoder has.
    """
    shapes = {}
    for key, rank in (("base.block.1.weight", 4), ("out_conv.weight", 4)):
        if key not in state_dict:
            raise CheckpointError(f"the state dict does not fit the instance decoder: missing key {key}")
        if state_dict[key].dim() != rank:
            raise CheckpointError(
                f"the state dict does not fit the instance decoder: {key} has shape "
                f"{tuple(state_dict[key].shape)}, not that of a 2D convolution weight"
            )
        shapes[key] = state_dict[key].shape
    # micro-sam's rule: transposed convolutions sit in wrappers named "block", resampling ones "conv"
    transposed = any(".block." in k for k in state_dict if k.startswith("decoder.samplers"))
    return InstanceDecoderConfig(
        embed_dim=int(shapes["base.block.1.weight"][1]),
        initial_features=int(shapes["out_conv.weight"][1]),
        out_channels=int(shapes["out_conv.weight"][0]),
        transposed=transposed,
        scale=16 if any(k.startswith("deconv4.") for k in state_dict)
        else 8 if any(k.startswith("deconv3.") for k in state_dict) else 4,
        refine_width=int(state_dict["refine.body.0.weight"].shape[0]) if "refine.body.0.weight" in state_dict else 0,
        refine_depth=ImageRefiner.depth_of(state_dict) if "refine.body.0.weight" in state_dict else DEPTH,
    )


class _Single(nn.Module):
    """One layer under the attribute ``block``: the nesting that gives torch-em's key names."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.block = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _Resample(nn.Module):
    """Bilinear upsampling by 2, then a 1x1 convolution to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


def _upsampler(in_channels: int, out_channels: int, transposed: bool) -> nn.Module:
    if transposed:
        return _Single(nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2))
    return _Resample(in_channels, out_channels)


class ConvPair(nn.Module):
    """Two 3x3 convolutions, each after an instance norm (no affine parameters, no running
    statistics: every image is normalised by itself) and followed by a ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.InstanceNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.InstanceNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UpBlock(nn.Module):
    """Upsampling by 2, a 3x3 convolution, batch norm (its running statistics) and a ReLU."""

    def __init__(self, in_channels: int, out_channels: int, transposed: bool):
        super().__init__()
        self.block = nn.Sequential(
            _upsampler(in_channels, out_channels, transposed),
            _Single(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Levels(nn.Module):
    """The three decoder levels: upsample, merge the skip, two convolutions."""

    def __init__(self, features: Sequence[int], transposed: bool):
        super().__init__()
        pairs = list(zip(features[:-1], features[1:]))
        self.blocks = nn.ModuleList([ConvPair(c_in, c_out) for c_in, c_out in pairs])
        self.samplers = nn.ModuleList([_upsampler(c_in, c_out, transposed) for c_in, c_out in pairs])

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        for block, sampler, skip in zip(self.blocks, self.samplers, skips):
            x = sampler(x)
            # The skip has twice the channels of x: its central ones are merged, as torch-em's
            # centre crop (meant for spatial borders) does to every dimension.
            start = (skip.shape[1] - x.shape[1]) // 2
            x = block(torch.cat([x, skip[:, start:start + x.shape[1]]], dim=1))
        return x


class InstanceDecoder(nn.Module):
    """micro-sam's instance segmentation decoder (see the module docstring).

    Parameters
    ----------
    config
        Its shape; :func:`instance_decoder_from_state_dict` infers it from a checkpoint.
    """

    def __init__(self, config: InstanceDecoderConfig | None = None):
        super().__init__()
        self.config = config = config or InstanceDecoderConfig()
        f8, f4, f2, f1 = config.features
        t = config.transposed
        self.base = ConvPair(config.embed_dim, f8)
        self.decoder = Levels(config.features[: config.levels + 1], t)
        self.deconv1 = UpBlock(config.embed_dim, f8, t)
        self.deconv2 = UpBlock(f8, f4, t)
        if config.scale >= 8:
            self.deconv3 = UpBlock(f4, f2, t)
        if config.scale == UPSCALE:
            self.deconv4 = UpBlock(f2, f1, t)
            self.deconv_out = _upsampler(f1, f1, t)
            self.decoder_head = ConvPair(2 * f1, f1)
        else:
            self.decoder_head = ConvPair(config.features[config.levels], f1)
        self.out_conv = nn.Conv2d(f1, config.out_channels, 1)
        self.refine = (ImageRefiner(f1, config.refine_width, config.out_channels, config.refine_depth)
                       if config.refine_width else None)

    @property
    def needs_image(self) -> bool:
        """Whether :meth:`maps` needs the model input beside the embedding (an image refiner)."""
        return self.refine is not None

    def head(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last level's (B, f, h', w') features and (B, C, h', w') logits, ``scale``
        pixels per token, before any image refinement (which trains on them)."""
        embedding = embedding.to(self.out_conv.weight.dtype)
        skips = [self.deconv1(embedding)]
        skips.append(self.deconv2(skips[-1]))
        if self.config.scale >= 8:
            skips.append(self.deconv3(skips[-1]))
        x = self.decoder(self.base(embedding), skips)
        if self.config.scale == UPSCALE:
            x = torch.cat([self.deconv_out(x), self.deconv4(skips[-1])], dim=1)
        features = self.decoder_head(x)
        return features, self.out_conv(features)

    def maps(self, embedding: torch.Tensor, image: torch.Tensor | None = None,
             window: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """The output maps in the model input frame, before any resizing.

        Parameters
        ----------
        embedding
            (B, embed_dim, h, w) image embeddings, as SAM's image encoder gives them
            (h = w = input side / 16).
        image
            (B, 3, 16 h, 16 w): what the image encoder read (``Sam.preprocess``'s output:
            normalised, zero-padded). Needed by a decoder with an image refiner
            (:attr:`needs_image`), ignored by the others, as is ``window``: the part of
            the maps that will be used, if not all (:meth:`ImageRefiner.forward`).

        Returns
        -------
        torch.Tensor
            (B, out_channels, 16 h, 16 w) in [0, 1]: pixel (r, c) covers the same pixel
            of the padded square model input.
        """
        if embedding.dim() != 4 or embedding.shape[1] != self.config.embed_dim:
            raise ValueError(f"the instance decoder takes (B, {self.config.embed_dim}, h, w) image embeddings, "
                             f"not a tensor of shape {tuple(embedding.shape)}")
        want = (embedding.shape[0], 3, UPSCALE * embedding.shape[-2], UPSCALE * embedding.shape[-1])
        if self.refine is not None and (image is None or tuple(image.shape) != want):
            raise ValueError(f"this instance decoder refines its maps with the image: it takes the model input "
                             f"{want} beside the embedding, not {None if image is None else tuple(image.shape)}")
        features, logits = self.head(embedding)
        if self.refine is not None:
            return torch.sigmoid(self.refine(features, logits, image, window))
        if self.config.scale != UPSCALE:
            logits = F.interpolate(logits, scale_factor=UPSCALE // self.config.scale, mode="bilinear",
                                   align_corners=False)
        return torch.sigmoid(logits)

    @staticmethod
    def resize(
        maps: torch.Tensor,
        input_size: Sequence[int],
        original_size: Sequence[int],
        image_size: int | None = None,
    ) -> torch.Tensor:
        """Maps in the model input frame brought to the original image, as micro-sam does.

        Parameters
        ----------
        maps
            (B, C, H, W) from :meth:`maps`.
        input_size
            (rows, cols) of the image after resizing its longest side to the model input,
            before padding: the part of the input frame that holds the image.
        original_size
            (rows, cols) of the image (or tile) the embedding was computed from.
        image_size
            Side of the square model input (SAM's ``image_size``); by default the maps'
            width, which it equals for every SAM encoder (16 pixels per token).

        Returns
        -------
        torch.Tensor
            (B, C, rows, cols) of ``original_size``, bilinearly resampled.
        """
        side = int(image_size if image_size is not None else maps.shape[-1])
        rows, cols = (int(n) for n in input_size)
        out_rows, out_cols = (int(n) for n in original_size)
        if not (0 < rows <= side and 0 < cols <= side) or out_rows < 1 or out_cols < 1:
            raise ValueError(
                f"input_size {tuple(input_size)} must lie inside the {side}x{side} model input and "
                f"original_size {tuple(original_size)} must be positive"
            )
        # Interpolating to the size a tensor already has reproduces it exactly: skipped.
        if tuple(maps.shape[-2:]) != (side, side):
            maps = F.interpolate(maps, (side, side), mode="bilinear", align_corners=False)
        maps = maps[..., :rows, :cols]
        if (rows, cols) != (out_rows, out_cols):
            maps = F.interpolate(maps, (out_rows, out_cols), mode="bilinear", align_corners=False)
        return maps

    def forward(
        self,
        embedding: torch.Tensor,
        input_size: Sequence[int],
        original_size: Sequence[int],
        image_size: int | None = None,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Foreground and normalised centre and boundary distances of every pixel.

        Parameters
        ----------
        embedding
            (B, embed_dim, h, w) image embeddings of B images (or tiles) that share
            ``input_size`` and ``original_size``.
        input_size, original_size, image_size, image
            As for :meth:`resize`; ``image`` as for :meth:`maps` (a decoder that :attr:`needs_image`).

        Returns
        -------
        torch.Tensor
            (B, 3, rows, cols) in [0, 1] at ``original_size``, in (row, col) order:
            channel 0 foreground probability, 1 distance to the object's centre, 2 distance
            to its boundary (both normalised per object; see :data:`CHANNELS`).
        """
        return self.resize(self.maps(embedding, image), input_size, original_size, image_size)


def instance_decoder_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> InstanceDecoder:
    """An instance decoder with the configuration and the weights of a ``decoder_state``.

    Parameters
    ----------
    state_dict
        micro-sam's ``decoder_state``: torch-em UNETR keys without ``encoder.``.

    Returns
    -------
    InstanceDecoder
        In eval mode (batch norm uses its running statistics), on the CPU, float32.

    Raises
    ------
    CheckpointError
        Naming every missing and unexpected key and every shape that does not fit.
    """
    config = infer_decoder_config(state_dict)
    decoder = InstanceDecoder(config)
    check_state_dict(decoder.state_dict(), state_dict, what=f"the instance decoder ({config})")
    decoder.load_state_dict(dict(state_dict), strict=True)
    return decoder.eval()
