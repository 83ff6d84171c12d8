"""Losses for training SAM: focal and dice loss on mask logits, and the IoU-head loss.

SAM supervises masks with a linear combination of focal loss and dice loss at 20:1 and
trains its IoU head with the mean squared error between the predicted IoU and the IoU
the predicted mask actually has with the ground truth (Kirillov et al. 2023, appendix A).

Every function takes logits (any shape ``(..., H, W)``) and binary targets (0 or 1) that
broadcast against them, and returns one value per mask, shape ``(...)``: the caller
decides how to combine masks (SAM keeps the lowest loss of its three ambiguity-aware
masks, for instance), which a scalar mean would make impossible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.masks import iou

__all__ = [
    "FOCAL_ALPHA",
    "FOCAL_GAMMA",
    "FOCAL_WEIGHT",
    "DICE_WEIGHT",
    "sigmoid_focal_loss",
    "dice_loss",
    "mask_loss",
    "mask_iou",
    "iou_prediction_loss",
    "iou_ranking_loss",
]

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
FOCAL_WEIGHT = 20.0
DICE_WEIGHT = 1.0


def _check(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise ValueError("logits and targets must be torch tensors")
    if logits.ndim < 2:
        raise ValueError(f"logits must have shape (..., H, W), got {tuple(logits.shape)}")
    try:
        torch.broadcast_shapes(logits.shape, targets.shape)
    except RuntimeError:
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} do not broadcast against logits of shape {tuple(logits.shape)}"
        ) from None
    if targets.shape[-2:] != logits.shape[-2:]:
        raise ValueError(
            f"targets are {tuple(targets.shape[-2:])} pixels but the logits {tuple(logits.shape[-2:])}: "
            "resize the ground truth to the logits' frame first"
        )
    targets = targets.to(logits.dtype) if logits.is_floating_point() else targets.float()
    if ((targets != 0) & (targets != 1)).any():
        raise ValueError("targets must be binary (0 or 1)")
    return targets


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), averaged over the pixels of each mask.

    Per pixel, with ``p`` the sigmoid of the logit and ``t`` the target,
    ``p_t = p t + (1 - p)(1 - t)``, ``alpha_t = alpha t + (1 - alpha)(1 - t)`` and the loss
    is ``-alpha_t (1 - p_t)^gamma log(p_t)``.

    Parameters
    ----------
    logits
        ``(..., H, W)`` mask logits.
    targets
        Binary ``(..., H, W)`` ground truth (0 or 1) that broadcasts against ``logits``.
    alpha
        Weight of the foreground class (0.25 in SAM and RetinaNet); a negative value
        disables the class weighting.
    gamma
        Focusing exponent (2 in SAM and RetinaNet); 0 gives plain cross-entropy.

    Returns
    -------
    torch.Tensor
        Shape ``(...)``: the mean loss of each mask.

    Raises
    ------
    ValueError
        When the shapes do not broadcast or the targets are not binary.
    """
    targets = _check(logits, targets)
    logits = logits.float()
    targets = targets.float()
    # log(p_t) from the logits directly: stable where p_t underflows.
    ce = F.binary_cross_entropy_with_logits(logits, targets.expand_as(logits), reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean(dim=(-2, -1))


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft dice loss of each mask: ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)``.

    Parameters
    ----------
    logits
        ``(..., H, W)`` mask logits; ``p`` is their sigmoid.
    targets
        Binary ``(..., H, W)`` ground truth that broadcasts against ``logits``.
    smooth
        ``s`` above: keeps the loss defined (and zero) for an empty mask predicted empty.

    Returns
    -------
    torch.Tensor
        Shape ``(...)``, values in [0, 1].

    Raises
    ------
    ValueError
        When the shapes do not broadcast, the targets are not binary or ``smooth`` is
        negative.
    """
    if smooth < 0:
        raise ValueError(f"smooth must be >= 0, got {smooth}")
    targets = _check(logits, targets).float()
    p = torch.sigmoid(logits.float())
    targets = targets.expand_as(p)
    inter = (p * targets).sum(dim=(-2, -1))
    total = p.sum(dim=(-2, -1)) + targets.sum(dim=(-2, -1))
    return 1 - (2 * inter + smooth) / (total + smooth)


def mask_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    focal_weight: float = FOCAL_WEIGHT,
    dice_weight: float = DICE_WEIGHT,
    focal_alpha: float = FOCAL_ALPHA,
) -> torch.Tensor:
    """SAM's mask loss: ``focal_weight * focal + dice_weight * dice`` (20:1), per mask.

    Parameters
    ----------
    logits, targets
        As in :func:`sigmoid_focal_loss`.
    focal_weight, dice_weight
        Weights of the two terms.
    focal_alpha
        The focal loss's weight of object pixels (background: ``1 - alpha``); negative
        for no weighting. 0.25 favours background, which suits large objects; on objects
        a few pixels wide it pulls a model trained from scratch towards empty masks.

    Returns
    -------
    torch.Tensor
        Shape ``(...)``.
    """
    if focal_weight < 0 or dice_weight < 0:
        raise ValueError(f"loss weights must be >= 0, got focal {focal_weight}, dice {dice_weight}")
    return (
        focal_weight * sigmoid_focal_loss(logits, targets, alpha=focal_alpha) + dice_weight * dice_loss(logits, targets)
    )


def mask_iou(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU of the binarised prediction (``logits > threshold``) with the targets, per mask.

    Two empty masks agree perfectly: their IoU is 1.

    Parameters
    ----------
    logits, targets
        As in :func:`sigmoid_focal_loss`.
    threshold
        Logit above which a pixel belongs to the mask (0, SAM's ``mask_threshold``).

    Returns
    -------
    torch.Tensor
        Shape ``(...)``, no gradient.
    """
    targets = _check(logits, targets).detach() > 0.5
    return iou(logits.detach() > threshold, targets, empty=1.0)


def iou_prediction_loss(iou_predictions: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared error between the IoU head's prediction and each mask's actual IoU.

    Parameters
    ----------
    iou_predictions
        ``(...)`` predicted IoU, one per mask of ``logits``.
    logits
        ``(..., H, W)`` the predicted masks' logits.
    targets
        Binary ground truth that broadcasts against ``logits``.

    Returns
    -------
    torch.Tensor
        Shape ``(...)``; gradients reach only the IoU prediction (the actual IoU is a
        target, as in SAM).

    Raises
    ------
    ValueError
        When ``iou_predictions`` does not have one value per mask.
    """
    if tuple(iou_predictions.shape) != tuple(logits.shape[:-2]):
        raise ValueError(
            f"iou_predictions must have shape {tuple(logits.shape[:-2])} (one per mask), "
            f"got {tuple(iou_predictions.shape)}"
        )
    actual = mask_iou(logits, targets)
    return (iou_predictions.float() - actual) ** 2


def iou_ranking_loss(iou_predictions: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                     temperature: float = 0.05) -> torch.Tensor:
    """How badly the IoU head orders the masks of each prompt.

    For every pair of masks, a logistic loss on the difference of their predicted IoU,
    signed by which one really fits better and weighted by how much better: a head that
    predicts each object's quality well but cannot tell its masks apart (the squared
    error alone allows that) pays for every pair it ranks the wrong way round.

    Parameters
    ----------
    iou_predictions
        ``(N, C)`` predicted IoU of the C masks of N prompts.
    logits
        ``(N, C, H, W)`` their logits.
    targets
        Binary ground truth broadcasting against ``logits``.
    temperature
        Differences of predicted IoU this large count as a confident order.

    Returns
    -------
    torch.Tensor
        ``(N,)``: mean over the ordered pairs of each prompt (0 for a single mask).
    """
    if iou_predictions.ndim != 2 or tuple(iou_predictions.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"iou_predictions must have shape {tuple(logits.shape[:2])}, got "
                         f"{tuple(iou_predictions.shape)}")
    actual = mask_iou(logits, targets)  # (N, C), no gradient
    better = actual[:, :, None] - actual[:, None, :]  # (N, C, C): i fits better than j by this much
    predicted = iou_predictions.float()
    margin = predicted[:, :, None] - predicted[:, None, :]
    pairs = better > 0
    loss = better.clamp(min=0) * torch.nn.functional.softplus(-margin / temperature)
    return loss.sum(dim=(1, 2)) / pairs.sum(dim=(1, 2)).clamp(min=1)
