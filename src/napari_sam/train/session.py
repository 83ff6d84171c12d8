"""The simulated interactive session on one image, and its loss.

SAM's recipe (Kirillov et al. 2023, appendix A): for several objects of an image, a
first prompt (one point inside the object, or its slightly noisy bounding box) is drawn
from the ground truth, the decoder answers, and a few corrective iterations follow, each
adding a click in the error region of the previous answer and feeding that answer's
low-res logits back as the mask prompt. Masks are supervised with focal and dice loss in
the decoder's low-res frame, the IoU head with the squared error to each mask's actual
IoU. For the single-point first prompt the decoder returns its three ambiguity-aware
masks and only the one with the lowest loss is supervised, so the other two stay free to
cover other readings of the click.

Every random draw comes from one ``numpy.random.Generator``, in a fixed order (objects,
first prompt, then per iteration the mask-prompt draw and the corrective clicks), so a
seed repeats a session exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..core.image_embedding import ImageEmbedding
from ..core.prompt_simulation import bounding_box, central_point, corrective_point, random_point
from .config import TrainingConfig
from .dataset import object_ids
from .frames import low_res_targets, model_scale, predicted_masks, upscale_low_res
from .losses import iou_prediction_loss, iou_ranking_loss, mask_iou, mask_loss

__all__ = ["LossParts", "corrective_clicks", "draw_objects", "first_prompt", "session_loss"]

_PAD_LABEL = -1  # the prompt encoder's "not a point": keeps prompt counts equal across objects

Decode = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""``decode(emb, points, labels, boxes, mask_input, multimask) -> (low, iou)``, float32
low-res logits (N, C, S, S) and predicted IoU (N, C)."""


@dataclass
class LossParts:
    """The loss of one simulated interactive session on one image.

    Attributes
    ----------
    loss
        ``mask_loss + iou_weight * iou_loss`` (a scalar tensor that can be backpropagated).
    mask_loss, iou_loss
        Means over objects and iterations.
    train_iou
        Mean IoU of the last iteration's masks (low-res frame).
    """

    loss: torch.Tensor
    mask_loss: torch.Tensor
    iou_loss: torch.Tensor
    train_iou: float


def draw_objects(labels: np.ndarray, config: TrainingConfig, rng: np.random.Generator) -> np.ndarray | None:
    """Up to ``objects_per_image`` objects of at least ``min_object_pixels`` pixels, drawn
    without replacement.

    Parameters
    ----------
    labels
        (H, W) integer instance labels, 0 = background.

    Returns
    -------
    numpy.ndarray or None
        (N, H, W) bool masks; None when no object is large enough.
    """
    ids = object_ids(labels, config.min_object_pixels)
    if ids.size == 0:
        return None
    chosen = rng.choice(ids, size=min(config.objects_per_image, ids.size), replace=False)
    return labels[None] == chosen[:, None, None]


def first_prompt(
    masks: np.ndarray, config: TrainingConfig, rng: np.random.Generator
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """The opening prompt of every object: all boxes (with probability
    ``box_probability``) or all single points, each drawn from the object's inner part
    with probability ``central_click_probability``, else uniformly inside it.

    Parameters
    ----------
    masks
        (N, H, W) bool.

    Returns
    -------
    tuple
        ``(boxes, points, labels)`` in plane pixels: boxes (N, 4) ``(x0, y0, x1, y1)`` or
        None; points (N, P, 2) ``(x, y)`` and labels (N, P) int64, with P = 0 for boxes
        and 1 for points.
    """
    n = len(masks)
    if rng.random() < config.box_probability:
        boxes = np.stack([bounding_box(m, rng, config.box_noise, config.max_box_noise) for m in masks])
        return boxes, np.zeros((n, 0, 2)), np.zeros((n, 0), np.int64)
    central = config.central_click_probability
    # no extra draw when it is off: earlier runs' seeds give the same prompts as before
    points = [central_point(m, rng) if central and rng.random() < central else random_point(m, rng) for m in masks]
    return None, np.stack(points)[:, None], np.ones((n, 1), np.int64)


def corrective_clicks(
    masks: np.ndarray, predictions: np.ndarray, rng: np.random.Generator, placement: str
) -> tuple[np.ndarray, np.ndarray]:
    """One corrective click per object (see
    :func:`~napari_sam.core.prompt_simulation.corrective_point`).

    Parameters
    ----------
    masks, predictions
        (N, H, W) bool ground truth and previous answers.

    Returns
    -------
    tuple
        Points (N, 1, 2) ``(x, y)`` in plane pixels and labels (N, 1) int64; an object
        already predicted perfectly gets the padding label -1 ("not a point").
    """
    n = len(masks)
    points = np.zeros((n, 1, 2))
    labels = np.full((n, 1), _PAD_LABEL, np.int64)
    for i in range(n):
        click = corrective_point(masks[i], predictions[i], rng, placement)
        if click is not None:
            points[i, 0], labels[i, 0] = click
    return points, labels


def session_loss(
    decode: Decode,
    model,
    emb: ImageEmbedding,
    masks: np.ndarray,
    config: TrainingConfig,
    rng: np.random.Generator,
) -> LossParts | None:
    """Simulate an interactive session on the objects ``masks`` and return its loss.

    Gradients flow when called with grad enabled.

    Parameters
    ----------
    decode
        Runs the decoder (see :data:`Decode`).
    model
        The Sam being trained (its input size, device and mask threshold).
    emb
        The image's embedding.
    masks
        (N, H, W) bool objects of the image, as :func:`draw_objects` gives them.
    config
        The settings (iterations, prompt probabilities, loss weights).
    rng
        Every random draw comes from it.

    Returns
    -------
    loss parts or None
        None when every object shrinks below one pixel of the low-res frame.
    """
    cfg = config
    device = model.device
    targets = low_res_targets(torch.from_numpy(masks).to(device), emb.input_size, model.config.image_size)
    # An object that shrinks below one low-res pixel (a small one in a large plane)
    # would teach the decoder to answer every prompt with nothing.
    visible = targets.flatten(1).any(dim=1).cpu().numpy()
    if not visible.all():
        if not visible.any():
            return None
        masks, targets = masks[visible], targets[torch.from_numpy(visible).to(device)]
    up = cfg.mask_loss_upscale
    if up != 1:  # judged where inference draws the outline: the logits enlarged, the objects finer
        targets = low_res_targets(torch.from_numpy(masks).to(device), emb.input_size, model.config.image_size, up)
    scale = model_scale(emb.input_size, emb.original_size)
    n = len(masks)

    box, pts, lbl = first_prompt(masks, cfg, rng)
    use_box = box is not None
    boxes = points = labels = None
    if use_box:
        boxes = torch.as_tensor(box * np.tile(scale, 2), dtype=torch.float32, device=device)

    total_mask = total_iou = 0.0
    mask_input = None
    rows = torch.arange(n, device=device)
    iterations = 1 + cfg.corrective_iterations
    for it in range(iterations):
        if pts.shape[1]:
            points = torch.as_tensor(pts * scale, dtype=torch.float32, device=device)
            labels = torch.as_tensor(lbl, device=device)
        # Only a lone point is ambiguous; SAM predicts three masks for it and
        # supervises the best one.
        multimask = it == 0 and not use_box
        low, iou = decode(emb, points, labels, boxes, mask_input, multimask)
        judged = upscale_low_res(low, up)
        per_mask = mask_loss(judged, targets, cfg.focal_weight, cfg.dice_weight, cfg.focal_alpha)  # (n, C)
        best = per_mask.detach().argmin(dim=1)
        total_mask = total_mask + per_mask[rows, best].mean()
        total_iou = total_iou + iou_prediction_loss(iou, judged, targets).mean()
        if multimask and cfg.iou_rank_weight > 0:
            total_iou = total_iou + cfg.iou_rank_weight * iou_ranking_loss(iou, judged, targets).mean()
        chosen_low = low[rows, best][:, None]
        if it == iterations - 1:
            train_iou = float(mask_iou(judged[rows, best][:, None], targets).mean())
            break
        pred = predicted_masks(model, chosen_low.detach(), emb)
        # (no draw at probability 1, so runs without the option repeat exactly)
        keep = cfg.mask_prompt_probability >= 1 or rng.random() < cfg.mask_prompt_probability
        mask_input = chosen_low.detach() if keep else None
        new_pts, new_lbl = corrective_clicks(masks, pred, rng, cfg.point_placement)
        pts = np.concatenate([pts, new_pts], axis=1)
        lbl = np.concatenate([lbl, new_lbl], axis=1)

    mask_part = total_mask / iterations
    iou_part = total_iou / iterations
    return LossParts(mask_part + cfg.iou_weight * iou_part, mask_part, iou_part, train_iou)
