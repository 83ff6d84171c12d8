"""Prompted segmentation of still images with SAM 2, as the official ``SAM2ImagePredictor``.

An image is resized to the model's S x S input (squashed, not padded: SAM 2 does not keep
the aspect ratio), its features are computed once, and prompts in the image's own pixel
frame are answered from them. Frames: points and boxes are (x, y) = (column, row) in
pixels of the original image; masks come back at the original (H, W); low-res logits are
(S/4, S/4) in the squashed model frame, fit to be passed back as ``mask_input``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .sam2 import Sam2

__all__ = ["Sam2ImagePredictor", "preprocess"]


def preprocess(image: Any, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """One RGB image to the normalised model input, as the official transforms do.

    Parameters
    ----------
    image
        (H, W, 3) array or tensor, rows x columns x RGB: uint8 in [0, 255], or floating
        point already in [0, 1] (as torchvision's ``ToTensor`` treats them).
    size
        Side S of the square model input.
    mean, std
        Per-channel normalisation of values in [0, 1].

    Returns
    -------
    (1, 3, S, S) float32: resized bilinearly with antialiasing (aspect ratio not kept),
    then normalised.
    """
    x = torch.as_tensor(image)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"the image must be (H, W, 3) RGB, not {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.is_floating_point():
        x = x.float()
    else:
        raise ValueError(f"the image must be uint8 or floating point in [0, 1], not {x.dtype}")
    x = x.permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


class Sam2ImagePredictor:
    """Image features once, then masks for any number of prompts.

    Parameters
    ----------
    model
        A loaded :class:`~.sam2.Sam2` (evaluation mode).
    mask_threshold
        Logit above which a pixel belongs to the mask.
    """

    def __init__(self, model: Sam2, mask_threshold: float = 0.0):
        self.model = model
        self.mask_threshold = mask_threshold
        self._features: dict[str, Any] | None = None
        self._orig_hw: list[tuple[int, int]] = []

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def is_image_set(self) -> bool:
        return self._features is not None

    def reset(self) -> None:
        """Forget the current image(s)."""
        self._features = None
        self._orig_hw = []

    @torch.no_grad()
    def set_image(self, image: Any) -> None:
        """Compute the features of one (H, W, 3) RGB image (see :func:`preprocess`)."""
        self.set_image_batch([image])

    @torch.no_grad()
    def set_image_batch(self, images: Sequence[Any]) -> None:
        """Compute the features of several (H_i, W_i, 3) RGB images in one batch; prompts
        then name the image by ``image_index``."""
        if len(images) == 0:
            raise ValueError("set_image_batch needs at least one image")
        self.reset()
        cfg = self.model.config
        inputs = [preprocess(im, cfg.image_size, cfg.pixel_mean, cfg.pixel_std) for im in images]
        dtype = self.model.no_mem_embed.dtype
        batch = torch.cat(inputs).to(self.device, dtype)
        self._features = self.features(batch)
        self._orig_hw = [(int(torch.as_tensor(im).shape[0]), int(torch.as_tensor(im).shape[1])) for im in images]

    def features(self, batch: torch.Tensor) -> dict[str, Any]:
        """Decoder inputs of a normalised batch (B, 3, S, S).

        Returns
        -------
        dict
            ``image_embed``: (B, C, S/16, S/16) with the "no memory" embedding added, as
            the official predictor does; ``high_res_feats``: [(B, C/8, S/4, S/4),
            (B, C/4, S/8, S/8)] (empty without high-resolution features).
        """
        model = self.model
        out = model.forward_image(batch)
        fpn = out["backbone_fpn"]
        embed = fpn[-1]
        if model.config.directly_add_no_mem_embed:
            embed = embed + model.no_mem_embed.view(1, -1, 1, 1)
        high_res = list(fpn[-model.num_feature_levels:-1]) if model.num_feature_levels > 1 else []
        return {"image_embed": embed, "high_res_feats": high_res}

    def get_image_embedding(self) -> torch.Tensor:
        """(B, C, S/16, S/16) features of the current image(s)."""
        return self._require()["image_embed"]

    def _require(self) -> dict[str, Any]:
        if self._features is None:
            raise ValueError("no image is set: call set_image(...) before predicting")
        return self._features

    def predict(
        self,
        point_coords: Any = None,
        point_labels: Any = None,
        box: Any = None,
        mask_input: Any = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        image_index: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for one prompt set, or one per box.

        Parameters
        ----------
        point_coords
            (N, 2) or (B, N, 2) points as (x, y) pixels of the original image.
        point_labels
            (N,) or (B, N): 1 foreground, 0 background.
        box
            (4,) or (B, 4) boxes as (x0, y0, x1, y1) pixels of the original image; B boxes
            are B objects (points, if any, then come as (B, N, 2)).
        mask_input
            (1, S/4, S/4) or (B, 1, S/4, S/4) low-res logits of an earlier prediction.
        multimask_output
            Three masks per object instead of one.
        return_logits
            Return logits instead of boolean masks.
        image_index
            Which image of :meth:`set_image_batch`.

        Returns
        -------
        masks : (M, H, W) bool, or logits with ``return_logits``; (B, M, H, W) for B > 1
            objects; M = 3 or 1; (H, W) the original image size
        iou_predictions : (M,) or (B, M)
        low_res_logits : (M, S/4, S/4) or (B, M, S/4, S/4), clamped to [-32, 32]
        """
        coords, labels, boxes, masks_in = self._prompts(point_coords, point_labels, box, mask_input, image_index)
        masks, ious, low = self.predict_torch(coords, labels, boxes, masks_in, multimask_output, return_logits,
                                              image_index)
        if masks.shape[0] == 1:
            return masks[0], ious[0], low[0]
        return masks, ious, low

    def _prompts(self, point_coords, point_labels, box, mask_input, image_index: int):
        """The prompts as tensors in the model-input frame."""
        self._require()
        if not 0 <= image_index < len(self._orig_hw):
            raise ValueError(f"image_index {image_index} is not one of the {len(self._orig_hw)} images set")
        h, w = self._orig_hw[image_index]
        size = self.model.image_size
        coords = labels = boxes = masks = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            coords = torch.as_tensor(point_coords, dtype=torch.float32, device=self.device)
            labels = torch.as_tensor(point_labels, dtype=torch.int32, device=self.device)
            if coords.ndim == 2:
                coords, labels = coords[None], labels[None]
            if coords.ndim != 3 or coords.shape[-1] != 2 or tuple(labels.shape) != tuple(coords.shape[:2]):
                raise ValueError(f"point_coords must be (N, 2) or (B, N, 2) with labels (N,) or (B, N); got "
                                 f"{tuple(coords.shape)} and {tuple(labels.shape)}")
            # normalised by the image size first, then scaled, in the official order
            coords = coords / torch.tensor([w, h], device=self.device) * size
        if box is not None:
            boxes = torch.as_tensor(box, dtype=torch.float32, device=self.device)
            if boxes.shape[-1] != 4 or boxes.ndim > 2:
                raise ValueError(f"box must be (4,) or (B, 4) as (x0, y0, x1, y1), not {tuple(boxes.shape)}")
            boxes = boxes.reshape(-1, 2, 2) / torch.tensor([w, h], device=self.device) * size
        if mask_input is not None:
            masks = torch.as_tensor(mask_input, dtype=torch.float32, device=self.device)
            if masks.ndim == 3:
                masks = masks[None]
        return coords, labels, boxes, masks

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        image_index: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for B prompt sets on one image, with prompts already in the model frame.

        Parameters
        ----------
        point_coords, point_labels
            (B, N, 2) as (x, y) in the S x S model-input frame and (B, N) labels (1
            foreground, 0 background), or None.
        boxes
            (B, 2, 2) box corners (top-left, bottom-right) as (x, y) in the model frame.
        mask_input
            (B, 1, S/4, S/4) low-res logits.

        Returns
        -------
        masks : (B, M, H, W) at the original image size (bool, or logits with ``return_logits``)
        iou_predictions : (B, M)
        low_res_logits : (B, M, S/4, S/4), clamped to [-32, 32]
        """
        feats = self._require()
        model = self.model
        points: tuple[torch.Tensor, torch.Tensor] | None = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            points = (point_coords, point_labels)
        if boxes is not None:
            # a box is two points labelled 2 and 3, placed before the clicks
            corner_labels = torch.tensor([[2, 3]], dtype=torch.int32, device=boxes.device).repeat(boxes.shape[0], 1)
            if points is None:
                points = (boxes, corner_labels)
            else:
                points = (torch.cat([boxes, points[0]], dim=1), torch.cat([corner_labels, points[1]], dim=1))
        enc = model.sam_prompt_encoder
        sparse, dense = enc(points, None, mask_input)
        embed = feats["image_embed"][image_index : image_index + 1]
        high_res = [f[image_index : image_index + 1] for f in feats["high_res_feats"]]
        low, ious, _, _ = model.sam_mask_decoder.predict(
            embed, enc.get_dense_pe(), sparse, enc.no_mask_dense() if dense is None else dense,
            multimask_output, high_res or None,
        )
        low = low.float()
        masks = F.interpolate(low, self._orig_hw[image_index], mode="bilinear", align_corners=False)
        if not return_logits:
            masks = masks > self.mask_threshold
        return masks, ious, low.clamp(-32.0, 32.0)
