"""SAM's prompt encoder: points, boxes and masks to sparse tokens and a dense embedding."""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from .common import LayerNorm2d

# Point labels as the decoder understands them; -1 marks the padding point that the
# official code appends when no box is given.
PAD_LABEL = -1
BACKGROUND = 0
FOREGROUND = 1
# SAM 2 passes a box as two points with these labels (see PromptEncoder's corner_labels).
BOX_TOP_LEFT = 2
BOX_BOTTOM_RIGHT = 3


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (Tancik et al. 2020).

    Coordinates normalised to [0, 1] are mapped to ``[sin(2 pi f . p), cos(2 pi f . p)]``
    with a fixed Gaussian matrix ``f`` of shape (2, num_pos_feats) stored in the checkpoint.
    """

    positional_encoding_gaussian_matrix: torch.Tensor

    def __init__(self, num_pos_feats: int = 128):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the centre of every cell of an (h, w) grid: (C, h, w)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encode (B, N, 2) pixel coordinates given as (x, y) in an image of (h, w)."""
        size = coords.new_tensor([image_size[1], image_size[0]], dtype=torch.float32)
        return self._pe_encoding(coords.float() / size)


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    Parameters
    ----------
    embed_dim
        Token width (256).
    image_embedding_size
        (h, w) of the image embedding grid (64, 64).
    input_image_size
        (h, w) of the padded model input (1024, 1024); point coordinates are in this frame.
    mask_in_chans
        Hidden channels of the mask branch (16).
    corner_labels
        Also embed points labelled 2 and 3 as box corners (top-left, bottom-right), as
        SAM 2 does; SAM's own encoder gives such points no label embedding.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        corner_labels: bool = False,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.corner_labels = corner_labels
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # foreground point, background point, box top-left, box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid, (1, C, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _point_embedding(self, kind: int) -> torch.Tensor:
        # ModuleList items are typed as plain Modules; these are the Embeddings built above.
        return cast(nn.Embedding, self.point_embeddings[kind]).weight

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # pixel centres
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), PAD_LABEL)], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        # Padding points carry no position, only the learned "not a point" embedding.
        emb = torch.where(labels == PAD_LABEL, self.not_a_point_embed.weight, emb)
        emb = emb + torch.where(labels == BACKGROUND, self._point_embedding(0), 0.0)
        emb = emb + torch.where(labels == FOREGROUND, self._point_embedding(1), 0.0)
        if self.corner_labels:
            emb = emb + torch.where(labels == BOX_TOP_LEFT, self._point_embedding(2), 0.0)
            emb = emb + torch.where(labels == BOX_BOTTOM_RIGHT, self._point_embedding(3), 0.0)
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_kind = torch.cat([self._point_embedding(2), self._point_embedding(3)])
        return emb + corner_kind

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embed prompts in the padded 1024x1024 input frame.

        Parameters
        ----------
        points
            ``(coords, labels)``: coords (B, N, 2) as (x, y) pixels, labels (B, N) with
            1 foreground, 0 background, -1 padding.
        boxes
            (B, 4) as (x0, y0, x1, y1) pixels.
        masks
            (B, 1, 256, 256) low-res logits.

        Returns
        -------
        sparse : (B, N', C) point and box tokens
        dense : (B, C, 64, 64) mask embedding, or None when no mask was given (the caller
            then adds the learned no-mask embedding, which lets the decoder cache the
            image-side work that does not depend on the prompt).
        """
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        w = self.no_mask_embed.weight
        sparse = [w.new_empty(bs, 0, self.embed_dim)]
        if points is not None:
            sparse.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        dense = self.mask_downscaling(masks) if masks is not None else None
        return torch.cat(sparse, dim=1), dense

    def no_mask_dense(self) -> torch.Tensor:
        """The learned "no mask" embedding as a (1, C, 1, 1) tensor that broadcasts."""
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1)
