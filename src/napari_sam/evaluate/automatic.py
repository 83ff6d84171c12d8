"""Automatic segmentation quality: a label image per image from any segmenter (e.g.
:func:`grid_segmenter`), scored by the mean segmentation accuracy (mSA) and the accuracy
at IoU 0.5 and 0.75 (see :mod:`napari_sam.evaluate.metrics`)."""

from __future__ import annotations

from collections.abc import Callable, Generator

import numpy as np

from .data import load_pairs
from .metrics import instance_scores
from .progress import EvalProgress, run_to_end

__all__ = ["evaluate_automatic", "grid_segmenter", "iter_evaluate_automatic"]


def grid_segmenter(model, config=None, **options) -> Callable[[np.ndarray], np.ndarray]:
    """A segmenter for :func:`evaluate_automatic`: SAM's grid mode
    (:func:`~napari_sam.auto.segment_grid`) with ``config`` and ``options``."""
    from ..auto import segment_grid

    return lambda image: segment_grid(image, model, config, **options).labels


def iter_evaluate_automatic(
    pairs, segment: Callable[[np.ndarray], np.ndarray], name: str = "automatic"
) -> Generator[EvalProgress, None, dict]:
    """:func:`evaluate_automatic` as a generator: yields after each image."""
    pairs = load_pairs(pairs)
    per_image = []
    for n, pair in enumerate(pairs, start=1):
        pred = np.asarray(segment(np.asarray(pair.image)))
        if pred.shape != pair.labels.shape:
            raise ValueError(f"{pair.name}: the segmenter returned shape {pred.shape}, expected {pair.labels.shape}")
        per_image.append({"name": pair.name} | instance_scores(pair.labels, pred))
        yield EvalProgress(n, len(pairs), pair.name)
    mean = {
        k: float(np.mean([r[k] for r in per_image])) if per_image else float("nan")
        for k in ("msa", "ap50", "ap75")
    }
    return {"kind": "automatic", "method": name, "images": len(pairs), **mean, "per_image": per_image}


def evaluate_automatic(pairs, segment: Callable[[np.ndarray], np.ndarray], name: str = "automatic") -> dict:
    """Instance segmentation quality of an automatic segmenter.

    Parameters
    ----------
    pairs
        Anything :func:`~napari_sam.evaluate.data.load_pairs` takes.
    segment
        ``segment(image) -> labels``: an integer label image of the image's (H, W), e.g.
        :func:`grid_segmenter`.
    name
        Name of the method in the results.

    Returns
    -------
    dict
        ``kind="automatic"``, ``method``, ``images``, ``msa``, ``ap50``, ``ap75`` (means
        over images) and ``per_image``.
    """
    return run_to_end(iter_evaluate_automatic(pairs, segment, name))
