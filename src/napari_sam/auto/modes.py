"""Every automatic mode behind one call: which modes a model offers, and a plane or a
volume segmented in the mode asked for (or the one the model recommends).

The modes, in the order a menu shows them:

``"ais"``
    micro-sam's automatic instance segmentation: the instance decoder's maps
    post-processed by a seeded watershed (:mod:`~napari_sam.auto.ais`).
``"apg"``
    micro-sam's automatic prompt generation: objects found in the same maps become point
    prompts for SAM (:mod:`~napari_sam.auto.apg`).
``"auto"``
    SAM's grid of points (:mod:`~napari_sam.auto.grid`).
``"boxes"``
    boxes of a classical detector, each through SAM (:mod:`~napari_sam.auto.boxes`).

The first two need the model's instance decoder (:attr:`Sam.instance_decoder
<napari_sam.model.sam.Sam.instance_decoder>`). Settings start from the model's advice
(:func:`~napari_sam.auto.recommend.recommended`) and are overridden by keyword, each
keyword a field of the mode's settings (:class:`~napari_sam.auto.ais.AISSettings`,
:class:`~napari_sam.auto.apg.APGSettings`, :class:`~napari_sam.auto.grid.GridConfig`;
for ``"boxes"``: ``detector``, ``min_area``, ``batch_size``; ``"ais"`` also takes
``batch_size``, the tiles decoded at once, and ``augment``, test-time augmentation of the
maps: :mod:`~napari_sam.auto.augmentation`).

Every mode returns the same thing here: (H, W) uint32 labels, ids 1..n, 0 = background,
in the plane's (row, col) frame; a volume is (Z, H, W) with one id per 3D object
(:func:`~napari_sam.auto.link.link_planes`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator
from typing import Any

import numpy as np

from .ais import AISSettings, iter_ais
from .apg import APGSettings, iter_apg
from .boxes import DETECTORS, detect_boxes, iter_from_boxes
from .grid import GridConfig, iter_grid
from .link import link_planes
from .recommend import DECODER_MODES, MODES, Recommended, recommended
from .results import Progress, run

__all__ = [
    "BOXES_OPTIONS",
    "MODES",
    "PLANNERS",
    "available_modes",
    "reads_native_scale",
    "iter_segment_plane",
    "iter_segment_volume",
    "segment_plane",
    "segment_volume",
]

# Keywords of the modes whose settings are not one dataclass, with their defaults (those
# of segment_detections and iter_ais).
BOXES_OPTIONS = {"min_area": 25, "batch_size": 64}
"""The ``"boxes"`` mode's settings besides the detector, with their defaults."""
# batch_size None: instance_maps.default_batch_size; augment: auto.augmentation (slow).
_AIS_OPTIONS: dict = {"batch_size": None, "augment": False}

_PlaneRun = Callable[[Any, Any], Generator[Progress, None, np.ndarray]]


def available_modes(model) -> tuple[str, ...]:
    """The modes a model offers, in menu order: ``"ais"`` and ``"apg"`` first when it has
    an instance decoder, then ``"auto"`` and ``"boxes"``."""
    if model.instance_decoder is not None:
        return MODES
    return tuple(m for m in MODES if m not in DECODER_MODES)


def _settings(cls, advised, mode: str, overrides: dict, extra: dict) -> tuple[Any, dict]:
    """``advised`` (a dataclass) with the overrides that are its fields, and the extra
    keywords (``extra``: name -> default) with theirs; any other keyword is an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields - set(extra))
    if unknown:
        raise ValueError(
            f"mode {mode!r} has no setting {', '.join(map(repr, unknown))} "
            f"(it takes: {', '.join(sorted(fields | set(extra)))})"
        )
    settings = dataclasses.replace(advised, **{k: v for k, v in overrides.items() if k in fields})
    options = {k: overrides.get(k, v) for k, v in extra.items()}
    return settings, options


def reads_native_scale(model) -> bool:
    """Whether ``model``'s instance decoder must read embeddings at magnification 1.

    Instance decoders (micro-sam's, and any trained on planes at their own scale) learned
    their maps there: at the default model's magnification for prompts, such a decoder
    lost on held-out DSB images (mSA 0.415 against 0.434; docs/default_model.md, "Scale").
    A decoder trained on crops enlarged as the model's scale advice enlarges planes says
    so in the checkpoint (``metadata["instance_decoder"]["scale_matched"]``) and reads the
    prompts' embeddings."""
    provenance = getattr(model, "metadata", {}).get("instance_decoder") or {}
    return not (isinstance(provenance, dict) and provenance.get("scale_matched") is True)


def _for_decoder(model, embeddings):
    """The embeddings the instance decoder reads: these, or the same image's at
    magnification 1 (made once and cached beside them)."""
    at = getattr(embeddings, "at_magnification", None)
    return embeddings if at is None or not reads_native_scale(model) else at(1.0)


def _stained_settings(advised: AISSettings, overrides: dict) -> AISSettings:
    """The advice for stained planes with the caller's overrides; a sigma given in pixels
    replaces one that scales with the objects (the advice's), unless both are given."""
    fields = {f.name for f in dataclasses.fields(AISSettings)}
    given = {k: v for k, v in overrides.items() if k in fields}
    if "distance_smoothing" in given:
        given.setdefault("distance_smoothing_per_diameter", 0.0)
    return dataclasses.replace(advised, **given)


def _plan_ais(model, advice: Recommended, overrides: dict) -> _PlaneRun:
    ais, opts = _settings(AISSettings, advice.ais, "ais", overrides, _AIS_OPTIONS)
    stained = ais if advice.ais_stained is None else _stained_settings(advice.ais_stained, overrides)

    def run_ais(emb, plane):
        chosen = stained if getattr(emb.source, "stain", None) else ais
        return (yield from iter_ais(_for_decoder(model, emb), plane, model.instance_decoder, chosen,
                                    opts["batch_size"], opts["augment"]))

    return run_ais


def _plan_apg(model, advice: Recommended, overrides: dict) -> _PlaneRun:
    apg, _ = _settings(APGSettings, advice.apg, "apg", overrides, {})
    return lambda emb, plane: iter_apg(_for_decoder(model, emb), plane, model.instance_decoder, apg)


def _plan_grid(model, advice: Recommended, overrides: dict) -> _PlaneRun:
    grid, _ = _settings(GridConfig, advice.grid, "auto", overrides, {})

    def run_grid(emb, plane):
        return (yield from iter_grid(emb, plane, grid)).labels

    return run_grid


def _plan_boxes(model, advice: Recommended, overrides: dict) -> _PlaneRun:
    extra = {"detector": advice.detector, **BOXES_OPTIONS}
    unknown = sorted(set(overrides) - set(extra))
    if unknown:
        raise ValueError(f"mode 'boxes' has no setting {', '.join(map(repr, unknown))} (it takes: {', '.join(extra)})")
    opts = {k: overrides.get(k, v) for k, v in extra.items()}
    if opts["detector"] not in DETECTORS:
        raise ValueError(f"detector must be one of {', '.join(map(repr, DETECTORS))}, not {opts['detector']!r}")

    def run_boxes(emb, plane):
        boxes = detect_boxes(emb.source.read(plane), method=opts["detector"], min_area=opts["min_area"])
        result = yield from iter_from_boxes(emb, plane, boxes, opts["batch_size"], opts["min_area"])
        return result.labels

    return run_boxes


PLANNERS: dict[str, Callable[[Any, Recommended, dict], _PlaneRun]] = {
    "ais": _plan_ais, "apg": _plan_apg, "auto": _plan_grid, "boxes": _plan_boxes}
"""Per mode of :data:`~napari_sam.auto.recommend.MODES`: its settings checked once (the
model, its advice, the caller's keywords) into what segments one plane. A new mode is
one entry here (a test holds the two lists equal)."""


def _plan(model, mode: str | None, advice: Recommended | None, overrides: dict) -> _PlaneRun:
    """Check the mode and its settings once, and return what segments one plane."""
    advice = recommended(model) if advice is None else advice
    mode = advice.mode if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"unknown automatic mode {mode!r}; the modes are {', '.join(MODES)}")
    if mode not in available_modes(model):
        raise ValueError(
            f"mode {mode!r} needs an instance decoder, which this model lacks; "
            f"its modes are {', '.join(available_modes(model))}"
        )
    return PLANNERS[mode](model, advice, overrides)


def iter_segment_plane(
    embeddings, plane, mode: str | None = None, advice: Recommended | None = None, **overrides
) -> Generator[Progress, None, np.ndarray]:
    """Segment every object of one plane in an automatic mode.

    Parameters
    ----------
    embeddings
        The image's :class:`~napari_sam.core.embeddings.Embeddings` (its ``model`` is
        the SAM used, with its instance decoder for ``"ais"`` and ``"apg"``).
    plane
        Flat plane number or (t, z) tuple.
    mode
        One of :data:`MODES`; None for the one the model recommends (``advice.mode``).
    advice
        Settings to start from; None for :func:`~napari_sam.auto.recommend.recommended`
        of the embeddings' model.
    **overrides
        Settings of the mode to change (module docstring).

    Yields
    ------
    Progress
        As the mode reports it (tiles or boxes); closing the generator cancels.

    Returns
    -------
    numpy.ndarray
        Through ``StopIteration.value``: (H, W) uint32 labels, ids 1..n, 0 = background.

    Raises
    ------
    ValueError
        An unknown mode, a decoder mode for a model without an instance decoder, or a
        setting the mode does not have (raised on the first ``next``).
    """
    run_plane = _plan(embeddings.model, mode, advice, overrides)
    labels = yield from run_plane(embeddings, plane)
    return np.asarray(labels, dtype=np.uint32)


def iter_segment_volume(
    embeddings,
    mode: str | None = None,
    planes=None,
    advice: Recommended | None = None,
    link_iou: float = 0.3,
    **overrides,
) -> Generator[Progress, None, np.ndarray]:
    """Segment every plane in an automatic mode and link the objects through the planes.

    Parameters
    ----------
    embeddings
        The image's embeddings.
    mode, advice, **overrides
        As :func:`iter_segment_plane`.
    planes
        Flat plane numbers or (t, z) tuples in order (default: every plane).
    link_iou
        ``min_iou`` of :func:`~napari_sam.auto.link.link_planes`.

    Yields
    ------
    Progress
        The mode's own reports for each plane, and one ``stage="planes"`` report after
        each plane.

    Returns
    -------
    numpy.ndarray
        (Z, H, W) uint32 labels, Z = ``len(planes)``, one id per 3D object (1..n in order
        of first appearance).
    """
    planes = list(range(embeddings.source.n_planes)) if planes is None else list(planes)
    if not planes:
        raise ValueError("no planes to segment")
    if not 0 <= link_iou <= 1:
        raise ValueError(f"link_iou must be in [0, 1], got {link_iou}")
    run_plane = _plan(embeddings.model, mode, advice, overrides)
    found = []
    for i, plane in enumerate(planes, start=1):
        found.append(np.asarray((yield from run_plane(embeddings, plane)), dtype=np.uint32))
        yield Progress(i, len(planes), embeddings.source.flat_index(plane), None, "planes")
    return link_planes(found, link_iou)


def segment_plane(
    embeddings,
    plane,
    mode: str | None = None,
    advice: Recommended | None = None,
    progress: Callable[[Progress], object] | None = None,
    **overrides,
) -> np.ndarray:
    """:func:`iter_segment_plane` in one call; ``progress`` (if given) gets each report.
    Returns (H, W) uint32 labels."""
    return run(iter_segment_plane(embeddings, plane, mode, advice, **overrides), progress)


def segment_volume(
    embeddings,
    mode: str | None = None,
    planes=None,
    advice: Recommended | None = None,
    link_iou: float = 0.3,
    progress: Callable[[Progress], object] | None = None,
    **overrides,
) -> np.ndarray:
    """:func:`iter_segment_volume` in one call; ``progress`` (if given) gets each report.
    Returns (Z, H, W) uint32 labels linked in 3D."""
    return run(iter_segment_volume(embeddings, mode, planes, advice, link_iou, **overrides), progress)
