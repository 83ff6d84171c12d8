"""SAM's mask decoder: two-way transformer, 4x transposed-conv upscaling, hypernetwork MLPs
and the IoU prediction head."""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d
from .matmul import activation_of, linear
from .transformer import ImageContext, TwoWayTransformer


class MLP(nn.Module):
    """Plain MLP with ReLU between layers (keys ``layers.{i}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    """Predicts masks and their IoU from an image embedding and prompt tokens.

    Parameters
    ----------
    transformer_dim
        Channel width (256).
    transformer
        The :class:`TwoWayTransformer`.
    num_multimask_outputs
        Masks returned for an ambiguous prompt (3); one more token predicts the single mask.
    iou_head_depth, iou_head_hidden_dim
        Shape of the IoU head MLP (3, 256).
    """

    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ):
        super().__init__()
        self.transformer = transformer
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        sparse_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        image_embeddings: torch.Tensor | None = None,
        image_pe: torch.Tensor | None = None,
        dense_prompt_embeddings: torch.Tensor | None = None,
        context: ImageContext | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks.

        Parameters
        ----------
        sparse_prompt_embeddings
            (B, N, C) point and box tokens, one row per prompt set.
        multimask_output
            Return the three ambiguity-aware masks instead of the single one.
        image_embeddings, image_pe, dense_prompt_embeddings
            (1 or B, C, 64, 64) embedding, (1, C, 64, 64) positional encoding and
            (1 or B, C, 64, 64) dense prompt embedding; used when ``context`` is None.
        context
            Precomputed image-side work (:meth:`TwoWayTransformer.image_context`) that
            replaces the three tensors above.

        Returns
        -------
        masks : (B, 3 or 1, 256, 256) low-res mask logits
        iou_pred : (B, 3 or 1) predicted IoU
        """
        bs = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(bs, -1, -1), sparse_prompt_embeddings], dim=1)
        if context is None:
            if image_embeddings is None or image_pe is None or dense_prompt_embeddings is None:
                raise ValueError(
                    "the decoder needs image_embeddings, image_pe and dense_prompt_embeddings, or a context"
                )
            src = image_embeddings + dense_prompt_embeddings
            if src.shape[0] != bs:
                src = src.expand(bs, -1, -1, -1)
            hs, keys = self.transformer(tokens, src, image_pe)
            h, w = src.shape[-2:]
        else:
            hs, keys = self.transformer(tokens, context=context)
            h = w = math.isqrt(int(keys.shape[1]))
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        # Only the requested mask tokens go through their hypernetworks.
        wanted = range(1, self.num_mask_tokens) if multimask_output else range(0, 1)
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in wanted], dim=1)
        masks = self._upscale_and_project(keys.reshape(bs, h, w, -1), hyper_in)
        iou_pred = self.iou_prediction_head(iou_token_out)[:, wanted.start : wanted.stop]
        return masks, iou_pred

    def _upscale_and_project(
        self, src: torch.Tensor, hyper_in: torch.Tensor, skips: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Upscale (B, h, w, C) image tokens 4x and take their dot product with the
        hypernetwork outputs (B, M, C/8): (B, M, 4h, 4w) mask logits.

        ``skips`` (SAM 2): features (1 or B, C/4, 2h, 2w) and (1 or B, C/8, 4h, 4w) added
        to the outputs of the first and second transposed convolution, before the norm and
        activation that follow each.

        A 2x2 stride-2 transposed convolution maps every pixel independently to a 2x2
        block, so it is a per-pixel linear layer followed by a rearrangement. Computing it
        that way, channels last, avoids the slow transposed-convolution kernels and the
        channel-first LayerNorm copies on a CPU, and lets the rearrangement wait until
        the end, where only the M mask channels are left to move. The parameters are the
        official ``output_upscaling`` ones, used in place.
        """
        conv1, norm, act1, conv2, act2 = self.output_upscaling
        # Sequential items are typed as plain Modules; these are the layers built above.
        conv1, conv2 = cast(nn.ConvTranspose2d, conv1), cast(nn.ConvTranspose2d, conv2)
        norm = cast(LayerNorm2d, norm)
        B, h, w, _ = src.shape

        def as_linear(conv: nn.ConvTranspose2d, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
            if conv.bias is None:
                raise ValueError("the upscaling convolutions of a SAM decoder have a bias")
            # weight (in, out, 2, 2) -> (2 * 2 * out, in), outputs ordered (di, dj, out)
            cin, cout = conv.weight.shape[:2]
            weight = conv.weight.permute(2, 3, 1, 0).reshape(4 * cout, cin)
            y = linear(x, weight, conv.bias.repeat(4), activation)
            return y.reshape(*x.shape[:-1], 2, 2, cout)

        x = as_linear(conv1, src)  # (B, h, w, 2, 2, C/4)
        if skips is not None:
            # pixel (2 i + di, 2 j + dj) of a skip is element (i, j, di, dj) here
            s1, s0 = skips
            x = x + s1.reshape(s1.shape[0], -1, h, 2, w, 2).permute(0, 2, 4, 3, 5, 1)
        x = act1(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
        fused = activation_of(act2)
        if skips is not None:
            # pixel (4 i + 2 di + ei, 4 j + 2 dj + ej) is element (i, j, di, dj, ei, ej)
            s0 = s0.reshape(s0.shape[0], -1, h, 2, 2, w, 2, 2).permute(0, 2, 5, 3, 6, 4, 7, 1)
            x = act2(as_linear(conv2, x) + s0)
        else:
            x = as_linear(conv2, x, fused) if fused else act2(as_linear(conv2, x))  # (B, h, w, 2, 2, 2, 2, C/8)
        # (B, M, C/8) @ (B, C/8, 16 h w): a wide GEMM, the transpose costs nothing
        m = hyper_in @ x.reshape(B, -1, x.shape[-1]).transpose(1, 2)
        # pixel (i, j, di, dj, ei, ej) lies at row 4 i + 2 di + ei, column 4 j + 2 dj + ej
        m = m.reshape(B, -1, h, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
        return m.reshape(B, -1, 4 * h, 4 * w)
