"""How well a model in training answers single prompts on validation planes.

Each validation object is prompted once with its most central point (the mask with the
highest predicted IoU wins, as in the predictor) and once with its exact bounding box;
the IoU is measured at the original resolution. Objects are drawn with a fixed seed, so
successive validations compare the same objects.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..core.image_embedding import ImageEmbedding
from ..core.masks import bounding_box, iou
from ..core.prompt_simulation import interior_point
from .config import TrainingConfig
from .dataset import SegmentationDataset, object_ids
from .frames import model_scale, predicted_masks
from .session import Decode

__all__ = ["VALIDATION_SEED", "validation_iou"]

VALIDATION_SEED = 7919
"""Separates validation prompts from training draws of the same seed."""


@torch.no_grad()
def validation_iou(
    model,
    data: SegmentationDataset,
    config: TrainingConfig,
    embed: Callable[[SegmentationDataset, int], ImageEmbedding],
    decode: Decode,
) -> dict[str, float]:
    """Mean IoU of single-prompt predictions on ``data``.

    Parameters
    ----------
    model
        The Sam (put in eval mode here).
    data
        Validation pairs.
    config
        ``seed``, ``min_object_pixels`` and ``validation_objects`` are used.
    embed
        ``embed(data, index)``: the embedding of a pair's image.
    decode
        Runs the decoder (:data:`~napari_sam.train.session.Decode`).

    Returns
    -------
    dict
        ``iou`` (mean of both prompt kinds), ``point``, ``box`` and ``objects``.

    Raises
    ------
    ValueError
        When the data hold no object.
    """
    cfg = config
    device = model.device
    scores: dict[str, list[float]] = {"point": [], "box": []}
    model.eval()
    for index in range(len(data)):
        pair = data[index]
        ids = object_ids(pair.labels, cfg.min_object_pixels)
        if ids.size == 0:
            continue
        rng = np.random.default_rng([cfg.seed, VALIDATION_SEED, index])
        if cfg.validation_objects and ids.size > cfg.validation_objects:
            ids = np.sort(rng.choice(ids, size=cfg.validation_objects, replace=False))
        masks = pair.labels[None] == ids[:, None, None]
        emb = embed(data, index)
        scale = model_scale(emb.input_size, emb.original_size)
        pts = np.stack([interior_point(m) for m in masks])[:, None] * scale
        low, pred_iou = decode(
            emb,
            torch.as_tensor(pts, dtype=torch.float32, device=device),
            torch.ones(len(ids), 1, dtype=torch.int64, device=device),
            None,
            None,
            True,
        )
        best = low[torch.arange(len(ids)), pred_iou.argmax(dim=1)][:, None]
        scores["point"].extend(iou(predicted_masks(model, best, emb), masks).tolist())
        box = np.stack([bounding_box(m) for m in masks]) * np.tile(scale, 2)
        t_box = torch.as_tensor(box, dtype=torch.float32, device=device)
        low, _ = decode(emb, None, None, t_box, None, False)
        scores["box"].extend(iou(predicted_masks(model, low, emb), masks).tolist())
    if not scores["point"]:
        raise ValueError(f"the validation data hold no object of at least {cfg.min_object_pixels} pixels")
    point, box = float(np.mean(scores["point"])), float(np.mean(scores["box"]))
    return {"iou": (point + box) / 2, "point": point, "box": box, "objects": len(scores["point"])}
