"""Instance segmentation scores of a label image against the ground truth.

Metric definitions. Two objects match at threshold t when their IoU is *above* t
(strictly; for t >= 0.5 a ground-truth object then matches at most one predicted object
and vice versa). With TP matched pairs, FP unmatched predictions and FN unmatched
ground-truth objects, the accuracy at t is ``TP / (TP + FP + FN)``: the "average
precision" of the 2018 Data Science Bowl (which is not the area under a
precision-recall curve). ``ap50`` and ``ap75`` are that accuracy at t = 0.5 and 0.75;
``msa`` is its mean over t = 0.50, 0.55, ..., 0.95, the DSB score and micro-sam's mean
segmentation accuracy. An image with no objects in either label image scores 1. The
scores of a data set are means over its images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..core.masks import label_iou

__all__ = ["THRESHOLDS", "instance_scores", "mean_segmentation_accuracy", "object_f1", "segmentation_accuracy"]

THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
"""IoU thresholds 0.50, 0.55, ..., 0.95 of the mean segmentation accuracy."""


def _object_iou(gt, pred) -> np.ndarray:
    """(n_gt, n_pred) IoU of the objects of two label images, after checking them."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    if gt.dtype.kind not in "iub" or pred.dtype.kind not in "iub":
        raise ValueError(f"label images must be integer, got {gt.dtype} and {pred.dtype}")
    return label_iou(gt, pred)[2]


def _accuracy(iou: np.ndarray, threshold: float) -> float:
    n_gt, n_pred = iou.shape
    if n_gt == 0 and n_pred == 0:
        return 1.0
    # above 0.5 a match is unique, so counting pairs counts true positives
    tp = int((iou > threshold).sum()) if threshold >= 0.5 else _matched(iou, threshold)
    return tp / (n_gt + n_pred - tp)


def _matched(iou: np.ndarray, threshold: float) -> int:
    from scipy.optimize import linear_sum_assignment

    if iou.size == 0:
        return 0
    r, c = linear_sum_assignment(iou, maximize=True)
    return int((iou[r, c] > threshold).sum())


def segmentation_accuracy(gt, pred, threshold: float = 0.5) -> float:
    """TP / (TP + FP + FN) at one IoU threshold (the DSB 2018 "average precision").

    Parameters
    ----------
    gt, pred
        Integer label images of the same shape, 0 = background.
    threshold
        Objects match when their IoU is above this. Below 0.5 matches are made
        one-to-one by Hungarian assignment.

    Returns
    -------
    float
        In [0, 1]; 1 when neither image has objects.
    """
    return _accuracy(_object_iou(gt, pred), threshold)


def mean_segmentation_accuracy(gt, pred, thresholds: Sequence[float] = THRESHOLDS) -> float:
    """:func:`segmentation_accuracy` averaged over IoU thresholds (0.50:0.05:0.95)."""
    iou = _object_iou(gt, pred)
    return float(np.mean([_accuracy(iou, t) for t in thresholds]))


def instance_scores(gt, pred) -> dict:
    """``{"msa", "ap50", "ap75", "n_gt", "n_pred"}`` of one prediction (see the module
    docstring for the definitions)."""
    iou = _object_iou(gt, pred)
    return {
        "msa": float(np.mean([_accuracy(iou, t) for t in THRESHOLDS])),
        "ap50": _accuracy(iou, 0.5),
        "ap75": _accuracy(iou, 0.75),
        "n_gt": int(iou.shape[0]),
        "n_pred": int(iou.shape[1]),
    }


def object_f1(gt, pred, threshold: float = 0.5) -> dict:
    """Object-level precision, recall and F1 at one IoU threshold.

    Works on label images of any dimension: on (Z, H, W) volumes an object is a 3D
    object, so an object split into two ids along z, or two objects merged into one,
    costs a match (how 3D linking is judged).

    Parameters
    ----------
    gt, pred
        Integer label images of one shape, 0 = background.
    threshold
        Objects match when their IoU is above it (one-to-one by Hungarian assignment
        below 0.5).

    Returns
    -------
    dict
        ``{"precision", "recall", "f1", "tp", "n_gt", "n_pred"}``; precision, recall and
        F1 are 1 when neither image has objects.
    """
    iou = _object_iou(gt, pred)
    n_gt, n_pred = iou.shape
    tp = int((iou > threshold).sum()) if threshold >= 0.5 else _matched(iou, threshold)
    precision = tp / n_pred if n_pred else float(n_gt == 0)
    recall = tp / n_gt if n_gt else float(n_pred == 0)
    f1 = 2 * tp / (n_gt + n_pred) if n_gt + n_pred else 1.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "n_gt": n_gt, "n_pred": n_pred}
