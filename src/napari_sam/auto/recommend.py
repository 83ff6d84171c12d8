"""Which automatic mode and settings suit a model, as its checkpoint advises."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from .grid import GridConfig

__all__ = ["Recommended", "recommended"]


@dataclass(frozen=True)
class Recommended:
    """How to segment everything with a given model, as measured for it.

    Attributes
    ----------
    mode
        ``"auto"`` (grid of points) or ``"boxes"`` (detector boxes, each through SAM).
    detector
        :func:`~napari_sam.auto.boxes.detect_boxes` method for ``"boxes"``.
    grid
        Filters for ``"auto"``.
    """

    mode: str = "auto"
    detector: str = "otsu"
    grid: GridConfig = field(default_factory=GridConfig)


def recommended(model) -> Recommended:
    """What to use to segment everything with a model.

    The advice is the checkpoint's metadata ``"automatic"`` (:attr:`Sam.metadata`), a
    dict of these fields (``grid`` as :class:`~napari_sam.auto.grid.GridConfig`'s
    fields); without it, SAM's own settings (grid mode, predicted IoU above 0.88,
    stability above 0.95). The embedded default model carries
    ``{"mode": "boxes", "detector": "log", "grid": {"pred_iou_thresh": 0.6,
    "stability_thresh": 0.8}}``: it never predicts confidently enough for SAM's filters,
    so nothing would pass. On the held-out DSB images it measured mSA 0.342 / AP50 0.571
    with Laplacian-of-Gaussian boxes against 0.153 / 0.366 in grid mode with those
    relaxed filters and 0.287 / 0.423 for Otsu components alone (docs/volumes.md); the
    choice was made on DSB training images, where the order was the same.

    Parameters
    ----------
    model
        A loaded SAM (:func:`~napari_sam.core.models.load_model`).

    Returns
    -------
    Recommended
        SAM's settings when the checkpoint's advice is malformed (with a warning).
    """
    advice = model.metadata.get("automatic") or {}
    try:
        advice = dict(advice)
        grid = GridConfig(**dict(advice.pop("grid", {})))
        out = Recommended(grid=grid, **advice)
        if out.mode not in ("auto", "boxes") or out.detector not in ("otsu", "log"):
            raise ValueError(f"mode {out.mode!r}, detector {out.detector!r}")
    except (TypeError, ValueError) as err:  # a checkpoint is untrusted input
        warnings.warn(
            f"ignoring the checkpoint's advice on automatic segmentation ({err})", RuntimeWarning, stacklevel=2
        )
        return Recommended()
    return out
