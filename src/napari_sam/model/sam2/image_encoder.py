"""SAM 2's image encoder: the Hiera trunk, a feature-pyramid neck and the sine position
encoding of its levels (keys ``trunk.*``, ``neck.convs.{i}.conv.*``)."""

from __future__ import annotations

import math
from typing import Any, Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..matmul import linear
from .config import FpnNeckConfig, ImageEncoderConfig
from .hiera import Hiera


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of the (row, column) of every cell of a feature map.

    Parameters
    ----------
    num_pos_feats
        Output channels: the first half encodes the row (y), the second the column (x),
        each as interleaved sin/cos of the position over geometric wavelengths.
    temperature
        Base of the wavelengths.
    normalize, scale
        Positions run 1..n; normalised, they are divided by n (plus 1e-6) and multiplied by
        ``scale`` (2 pi when None).

    Notes
    -----
    The encoding depends on the map's shape only; it is computed once per (h, w, device)
    and returned expanded over the batch (read-only, as a broadcast view).
    """

    def __init__(self, num_pos_feats: int, temperature: float = 10000, normalize: bool = True,
                 scale: float | None = None):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, not {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("a scale of the sine positional encoding needs normalize=True")
        self.num_pos_feats = num_pos_feats // 2
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self._cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def _axis(self, n: int, device: torch.device) -> torch.Tensor:
        """(n, num_pos_feats) encoding of positions 1..n along one axis."""
        pos = torch.arange(1, n + 1, dtype=torch.float32, device=device)
        if self.normalize:
            pos = pos / (pos[-1:] + 1e-6) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)
        angles = pos[:, None] / dim_t
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    def encoding(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """The (num_pos_feats, h, w) encoding of an (h, w) grid."""
        key = (h, w, torch.device(device))
        pe = self._cache.get(key)
        if pe is None:
            ey, ex = self._axis(h, device), self._axis(w, device)
            pe = torch.cat([ey.T[:, :, None].expand(-1, h, w), ex.T[:, None, :].expand(-1, h, w)])
            self._cache[key] = pe
        return pe

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encoding (B, num_pos_feats, h, w) for a feature map x (B, C, h, w)."""
        pe = self.encoding(x.shape[-2], x.shape[-1], x.device)
        return pe[None].expand(x.shape[0], -1, -1, -1)


class FpnNeck(nn.Module):
    """Feature pyramid without output convolutions: every trunk level through a 1x1
    convolution to ``d_model`` channels; levels in ``fpn_top_down_levels`` also receive the
    2x-upsampled result of the level below them.

    Parameters
    ----------
    config
        See :class:`~napari_sam.model.sam2.config.FpnNeckConfig`.
    """

    def __init__(self, config: FpnNeckConfig):
        super().__init__()
        c = config
        pe = c.position_encoding
        self.position_encoding = PositionEmbeddingSine(pe.num_pos_feats, pe.temperature, pe.normalize, pe.scale)
        self.d_model = c.d_model
        self.backbone_channel_list = list(c.backbone_channel_list)
        convs = []
        for dim in c.backbone_channel_list:
            level = nn.Sequential()
            level.add_module("conv", nn.Conv2d(dim, c.d_model, c.kernel_size, c.stride, c.padding))
            convs.append(level)
        self.convs = nn.ModuleList(convs)
        self.fpn_interp_model = c.fpn_interp_model
        self.fuse_type = c.fuse_type
        levels = c.fpn_top_down_levels
        self.fpn_top_down_levels = list(range(len(convs)) if levels is None else levels)

    def forward(
        self,
        xs: list[torch.Tensor],
        levels: int | None = None,
        project: Sequence[nn.Conv2d | None] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Trunk levels (highest resolution first) to (features, position encodings).

        Parameters
        ----------
        xs
            (B, C_i, h_i, w_i) trunk outputs, highest resolution first.
        levels
            Return only the first (highest-resolution) ``levels`` levels; all when None.
            The others are still computed where a returned level needs their top-down path.
        project
            Per returned level, a 1x1 convolution applied to its features (SAM 2's
            ``conv_s0``/``conv_s1``), or None.

        Returns
        -------
        features : list of (B, d_model, h_i, w_i) contiguous (or the projection's channels)
        pos : list of (B, d_model, h_i, w_i) position encodings (broadcast views)

        Notes
        -----
        The 1x1 lateral convolutions run as linear layers on the channels-last trunk output,
        and the nearest-neighbour top-down path as a broadcast add into the 2x2 blocks of
        the lateral map. A projected level that only has a lateral path (no top-down input,
        not feeding one) gets a single linear layer: two 1x1 convolutions without anything
        between them compose into one, so the wide d_model map at stride 4 is never made.
        """
        n = len(self.convs) - 1
        if len(xs) != n + 1:
            raise ValueError(f"the neck expects {n + 1} trunk levels, got {len(xs)}")
        keep = n + 1 if levels is None else levels
        project = list(project or []) + [None] * (keep - len(project or []))
        out: list[torch.Tensor] = []
        prev: torch.Tensor | None = None  # channels-last (B, h, w, d_model)
        for i in range(n, -1, -1):
            conv = cast(nn.Conv2d, self.convs[n - i].conv)
            top_down = prev is not None and i in self.fpn_top_down_levels
            feeds = i > 0 and (i - 1) in self.fpn_top_down_levels
            if i >= keep and not feeds:
                prev = None
                continue
            proj = project[i] if i < keep else None
            if proj is not None and not top_down and not feeds:
                out.append(_conv1x1(xs[i], conv, proj))
                prev = None
                continue
            lateral = _lateral(xs[i], conv)
            if top_down:
                lateral = self._top_down(lateral, cast(torch.Tensor, prev))
            prev = lateral
            if i < keep:
                x = lateral.permute(0, 3, 1, 2)
                out.append(proj(x).contiguous() if proj is not None else x.contiguous())
        out.reverse()
        pos = [self.position_encoding(x).to(x.dtype) for x in out]
        return out, pos

    def _top_down(self, lateral: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """``lateral`` plus ``prev`` upsampled 2x, both channels-last (B, h, w, C)."""
        B, h, w, C = prev.shape
        in_place = not torch.is_grad_enabled() and lateral.dtype == torch.float32
        if in_place and self.fpn_interp_model == "nearest" and lateral.shape[1:3] == (2 * h, 2 * w):
            # every 2x2 block of the lateral map gets its coarse pixel added, in place
            lateral.view(B, h, 2, w, 2, C).add_(prev.float()[:, :, None, :, None, :])
            fused = lateral
        else:
            up = F.interpolate(prev.permute(0, 3, 1, 2).float(), scale_factor=2.0, mode=self.fpn_interp_model,
                               align_corners=None if self.fpn_interp_model == "nearest" else False)
            fused = lateral + up.permute(0, 2, 3, 1)
        return fused / 2 if self.fuse_type == "avg" else fused


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1


def _lateral(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A lateral convolution of a (B, C, h, w) level, returned channels-last (B, h, w, d)."""
    if not _is_pointwise(conv):
        return conv(x).permute(0, 2, 3, 1)
    return linear(x.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias)


def _conv1x1(x: torch.Tensor, first: nn.Conv2d, second: nn.Conv2d) -> torch.Tensor:
    """``second(first(x))`` for a (B, C, h, w) level, as one linear layer when both are
    1x1 convolutions: (B, C', h, w) contiguous."""
    if not (_is_pointwise(first) and _is_pointwise(second)):
        return second(first(x)).contiguous()
    w2 = second.weight.flatten(1)
    weight = w2 @ first.weight.flatten(1)
    bias = second.bias if first.bias is None else (w2 @ first.bias if second.bias is None else
                                                    torch.addmv(second.bias, w2, first.bias))
    return linear(x.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2).contiguous()


class ImageEncoder(nn.Module):
    """Trunk + neck (keys ``trunk.*``, ``neck.*``).

    Parameters
    ----------
    config
        See :class:`~napari_sam.model.sam2.config.ImageEncoderConfig`; ``scalp`` drops that
        many of the lowest-resolution levels from the output.
    """

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        self.trunk = Hiera(config.trunk)
        self.neck = FpnNeck(config.neck)
        self.scalp = config.scalp

    def forward(self, x: torch.Tensor, project: Sequence[nn.Conv2d | None] | None = None) -> dict[str, Any]:
        """Encode a normalised batch (B, 3, S, S).

        ``project``: per returned level, a 1x1 convolution to apply (see :meth:`FpnNeck.forward`).

        Returns
        -------
        dict
            ``backbone_fpn``: list of (B, d_model, S/4, S/4), (B, d_model, S/8, S/8), ...
            (highest resolution first, ``scalp`` lowest levels dropped);
            ``vision_pos_enc``: their position encodings, same shapes;
            ``vision_features``: the last (lowest-resolution) entry of ``backbone_fpn``.
        """
        trunk = self.trunk(x)
        features, pos = self.neck(trunk, len(trunk) - self.scalp, project)
        return {"vision_features": features[-1], "vision_pos_enc": pos, "backbone_fpn": features}
