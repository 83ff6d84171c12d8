"""Which automatic mode and settings suit a model, as its checkpoint advises."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

from ..model.decoder_checkpoint import DECODER_MODES
from .ais import AISSettings
from .apg import APGSettings
from .boxes import DETECTORS
from .grid import GridConfig

__all__ = ["DECODER_MODES", "Recommended", "recommended"]

MODES = ("ais", "apg", "auto", "boxes")
"""Every automatic mode by name, in display order: the one list the API, CLI, widget and
evaluation take them from."""


@dataclass(frozen=True)
class Recommended:
    """How to segment everything with a given model, as measured for it.

    Attributes
    ----------
    mode
        ``"auto"`` (grid of points), ``"boxes"`` (detector boxes, each through SAM),
        ``"ais"`` or ``"apg"`` (the instance decoder's modes; see
        :mod:`~napari_sam.auto.modes`).
    detector
        :func:`~napari_sam.auto.boxes.detect_boxes` method for ``"boxes"``.
    grid
        Filters for ``"auto"``.
    ais
        Post-processing for ``"ais"``.
    ais_stained
        Post-processing for ``"ais"`` on planes read as a stain (stained brightfield read
        as its haematoxylin, :attr:`ImageSource.stain
        <napari_sam.core.image_source.ImageSource.stain>`); None: ``ais`` there too.
    apg
        Settings for ``"apg"``.
    """

    mode: str = "auto"
    detector: str = "otsu"
    grid: GridConfig = field(default_factory=GridConfig)
    ais: AISSettings = field(default_factory=AISSettings)
    ais_stained: AISSettings | None = None
    apg: APGSettings = field(default_factory=APGSettings)


def _warn(message: str) -> None:
    # stacklevel 3: the caller of recommended()
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def recommended(model) -> Recommended:
    """What to use to segment everything with a model.

    The advice is the checkpoint's metadata ``"automatic"`` (:attr:`Sam.metadata`), a
    dict of these fields (``grid``, ``ais`` and ``apg`` as dicts of
    :class:`~napari_sam.auto.grid.GridConfig`'s, :class:`~napari_sam.auto.ais.AISSettings`'
    and :class:`~napari_sam.auto.apg.APGSettings`' fields; ``ais_stained`` as the fields
    of ``ais`` that differ on planes read as a stain); without it, SAM's own settings (grid
    mode, predicted IoU above 0.88, stability above 0.95).

    A model with an instance decoder (:attr:`Sam.instance_decoder`) whose advice names no
    mode gets ``"ais"``, as micro-sam recommends AIS whenever a decoder exists. Advice
    naming ``"ais"`` or ``"apg"`` for a model without a decoder (a checkpoint whose
    ``decoder_state`` is missing) falls back, with a warning, to ``"boxes"`` when the
    advice names a detector and to ``"auto"`` otherwise, keeping its other settings.

    The embedded default model carries ``{"mode": "ais", "ais": {"boundary_distance_threshold":
    0.6, "min_size": 25}, "detector": "log", "grid": {"pred_iou_thresh": 0.6,
    "stability_thresh": 0.8}}``: on the held-out DSB images its AIS measured mSA 0.434 /
    AP50 0.673 against 0.342 / 0.571 with Laplacian-of-Gaussian boxes, 0.325 / 0.565 with
    APG and 0.096 / 0.263 with the grid under those relaxed filters (it never predicts
    confidently enough for SAM's own); the AIS thresholds were chosen on DSB training
    images (docs/automatic.md). For H&E read as its haematoxylin it adds
    ``"ais_stained": {"boundary_distance_threshold": 0.7, "foreground_threshold": 0.4,
    "distance_smoothing_per_diameter": 0.143}``, chosen on its H&E training images (MoNuSeg
    AIS mSA 0.072 -> 0.124, docs/automatic.md, "H&E: smoothing that follows the nuclei's
    size").

    Parameters
    ----------
    model
        A loaded SAM (:func:`~napari_sam.core.models.load_model`).

    Returns
    -------
    Recommended
        SAM's settings (or ``"ais"`` with micro-sam's settings for a model with a
        decoder) when the checkpoint's advice is malformed (with a warning).
    """
    has_decoder = model.instance_decoder is not None
    fallback = Recommended(mode="ais") if has_decoder else Recommended()
    advice = model.metadata.get("automatic") or {}
    try:
        advice = dict(advice)
        named_mode = "mode" in advice
        ais = dict(advice.pop("ais", {}))
        stained = advice.pop("ais_stained", None)
        settings = {
            "grid": GridConfig(**dict(advice.pop("grid", {}))),
            "ais": AISSettings(**ais),
            "ais_stained": None if stained is None else AISSettings(**{**ais, **dict(stained)}),
            "apg": APGSettings(**dict(advice.pop("apg", {}))),
        }
        out = Recommended(**settings, **advice)
        if out.mode not in MODES or out.detector not in DETECTORS:
            raise ValueError(f"mode {out.mode!r}, detector {out.detector!r}")
    except (TypeError, ValueError) as err:  # a checkpoint is untrusted input
        _warn(f"ignoring the checkpoint's advice on automatic segmentation ({err})")
        return fallback
    if not named_mode and has_decoder:
        return replace(out, mode="ais")
    if out.mode in DECODER_MODES and not has_decoder:
        mode = "boxes" if "detector" in advice else "auto"
        _warn(
            f"the checkpoint advises mode {out.mode!r} but the model has no instance decoder; using {mode!r}"
        )
        return replace(out, mode=mode)
    return out
