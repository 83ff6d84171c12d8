"""Automatic segmentation quality: a label image per image, scored by the mean
segmentation accuracy (mSA) and the accuracy at IoU 0.5 and 0.75 (see
:mod:`napari_sam.evaluate.metrics`), with the time each image took.

Two ways in:

* :func:`evaluate_automatic` scores any segmenter, ``segment(image) -> labels`` (e.g.
  :func:`grid_segmenter`, or :func:`watershed_segmenter`, the classical baseline);
* :func:`evaluate_modes` scores every automatic mode a model offers
  (:func:`~napari_sam.auto.modes.available_modes`: AIS and APG with an instance decoder,
  SAM's grid ``"auto"``, detector ``"boxes"``), each with the settings the model
  recommends (:func:`~napari_sam.auto.recommend.recommended`), beside the classical
  baseline. Each image is embedded once (tiles of the model's default tiling, in memory)
  and every mode works from those embeddings, so a mode's time per plane is its own work;
  the embedding time is reported separately, once per image.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Generator, Sequence

import numpy as np

from ..model.decoder_checkpoint import DECODER_MODES
from .baseline import watershed_instances
from .data import EvalPair, load_pairs
from .metrics import instance_scores
from .progress import EvalProgress, run_to_end

__all__ = [
    "evaluate_automatic",
    "evaluate_modes",
    "grid_segmenter",
    "iter_evaluate_automatic",
    "iter_evaluate_modes",
    "select_modes",
    "watershed_segmenter",
]

BASELINE = "watershed baseline"
"""Name of the classical baseline's row."""
_BASELINE_MIN_AREA = 15


def grid_segmenter(model, config=None, **options) -> Callable[[np.ndarray], np.ndarray]:
    """A segmenter for :func:`evaluate_automatic`: SAM's grid mode
    (:func:`~napari_sam.auto.segment_grid`) with ``config`` and ``options``."""
    from ..auto import segment_grid

    return lambda image: segment_grid(image, model, config, **options).labels


def watershed_segmenter(min_area: int = 15, **options) -> Callable[[np.ndarray], np.ndarray]:
    """A segmenter for :func:`evaluate_automatic`: the classical baseline without SAM
    (:func:`~napari_sam.evaluate.baseline.watershed_instances`: local threshold, object
    centres from the distance transform, watershed)."""
    return lambda image: watershed_instances(image, min_area, **options)


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows])) if rows else float("nan")


def _result(method: str, per_image: list[dict], **extra) -> dict:
    scores = {k: _mean(per_image, k) for k in ("msa", "ap50", "ap75")}
    return {
        "kind": "automatic", "method": method, "images": len(per_image), **scores,
        "seconds_per_plane": _mean(per_image, "seconds"), **extra, "per_image": per_image,
    }


def _scored(pair: EvalPair, pred, seconds: float) -> dict:
    pred = np.asarray(pred)
    if pred.shape != pair.labels.shape:
        raise ValueError(f"{pair.name}: the segmenter returned shape {pred.shape}, expected {pair.labels.shape}")
    return {"name": pair.name} | instance_scores(pair.labels, pred) | {"seconds": seconds}


def iter_evaluate_automatic(
    pairs, segment: Callable[[np.ndarray], np.ndarray], name: str = "automatic"
) -> Generator[EvalProgress, None, dict]:
    """:func:`evaluate_automatic` as a generator: yields after each image."""
    pairs = load_pairs(pairs)
    per_image = []
    for n, pair in enumerate(pairs, start=1):
        start = time.perf_counter()
        pred = segment(np.asarray(pair.image))
        per_image.append(_scored(pair, pred, time.perf_counter() - start))
        yield EvalProgress(n, len(pairs), pair.name)
    return _result(name, per_image)


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
        over images), ``seconds_per_plane`` (mean wall time of ``segment``) and
        ``per_image`` (``name``, ``msa``, ``ap50``, ``ap75``, ``n_gt``, ``n_pred``,
        ``seconds``).
    """
    return run_to_end(iter_evaluate_automatic(pairs, segment, name))


def select_modes(model, modes: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """The automatic modes to measure, checked against what the model offers.

    Parameters
    ----------
    model
        A loaded SAM, or None (no mode: the baseline alone).
    modes
        None for every mode the model offers
        (:func:`~napari_sam.auto.modes.available_modes`), or names from
        :data:`~napari_sam.auto.modes.MODES` as a sequence or one comma-separated string
        (``"ais,boxes"``).

    Returns
    -------
    tuple of str
        In the display order of :data:`~napari_sam.auto.modes.MODES`, without repeats.

    Raises
    ------
    ValueError
        An unknown mode, a mode the model does not offer (AIS and APG need an instance
        decoder), no mode at all, or modes without a model.
    """
    from ..auto.modes import MODES, available_modes

    if modes is None:
        return () if model is None else available_modes(model)
    names = [m.strip() for m in modes.split(",")] if isinstance(modes, str) else [str(m).strip() for m in modes]
    names = [m for m in names if m]
    if not names:
        raise ValueError(f"no automatic mode given; the modes are {', '.join(MODES)}")
    unknown = [m for m in names if m not in MODES]
    if unknown:
        raise ValueError(f"unknown automatic mode {unknown[0]!r}; the modes are {', '.join(MODES)}")
    if model is None:
        raise ValueError(f"automatic mode(s) {', '.join(names)} need a model")
    offered = available_modes(model)
    missing = [m for m in names if m not in offered]
    if missing:
        raise ValueError(
            f"automatic mode {missing[0]!r} needs an instance decoder, which this model lacks; "
            f"its modes are {', '.join(offered)}"
        )
    return tuple(m for m in MODES if m in names)


def _mode_settings(advice, mode: str) -> dict:
    """The settings a mode runs with under ``advice``, as a JSON-able dict."""
    if mode == "boxes":
        from ..auto.modes import BOXES_OPTIONS

        return {"detector": advice.detector, **BOXES_OPTIONS}
    if mode == "ais" and advice.ais_stained is not None:  # planes read as a stain (H&E) get their own
        return dict(dataclasses.asdict(advice.ais), stained=dataclasses.asdict(advice.ais_stained))
    return dataclasses.asdict({"ais": advice.ais, "apg": advice.apg, "auto": advice.grid}[mode])


def _describe(mode: str, settings: dict) -> str:
    """A few words on the settings that matter most in each mode, for a table."""
    s = settings
    if mode == "auto":
        return (f"{s['points_per_side']}^2 points, IoU > {s['pred_iou_thresh']:g}, "
                f"stability > {s['stability_thresh']:g}")
    if mode == "boxes":
        return f"{s['detector']} detector, min area {s['min_area']}"
    if mode in DECODER_MODES:  # their settings are AIS's
        text = (f"centre < {s['center_distance_threshold']:g}, boundary < {s['boundary_distance_threshold']:g}, "
                f"foreground > {s['foreground_threshold']:g}")
        if s.get("distance_smoothing_per_diameter"):
            text += f", distance sigma {s['distance_smoothing_per_diameter']:g} x diameter"
        return text + (f"; stained planes: {_describe(mode, s['stained'])}" if "stained" in s else "")
    return ", ".join(f"{k} {v}" for k, v in s.items())


def _embed(image: np.ndarray, model, magnification=None, channel=None):
    """The image's embeddings in memory, every tile computed now, and the seconds it took."""
    from ..core.embeddings import Embeddings

    image = np.asarray(image)
    if image.ndim == 2:
        axes = "YX"
    elif image.ndim == 3 and image.shape[-1] in (3, 4):
        axes = "YXC"
    else:
        raise ValueError(f"automatic modes are measured on (H, W) or (H, W, 3|4) planes, got shape {image.shape}")
    start = time.perf_counter()
    emb = Embeddings(image, model, cache=False, axes=axes, channel=channel, magnification=magnification)
    for _ in emb.precompute(verify=False):
        pass
    return emb, time.perf_counter() - start


def iter_evaluate_modes(
    pairs,
    model,
    modes: str | Sequence[str] | None = None,
    *,
    advice=None,
    baseline: bool = True,
    name: str | None = None,
    augment: bool = False,
    channel: str | None = None,
) -> Generator[EvalProgress, None, list[dict]]:
    """:func:`evaluate_modes` as a generator: yields after each image (all its modes)."""
    from ..auto.modes import iter_segment_plane, reads_native_scale
    from ..auto.recommend import recommended
    from ..auto.results import run

    modes = select_modes(model, modes)
    if augment and "ais" not in modes:
        raise ValueError("augment measures AIS with test-time augmentation: it needs the 'ais' mode among the modes")
    if not modes and not baseline:
        raise ValueError("nothing to measure: no automatic mode and no baseline")
    pairs = load_pairs(pairs)
    for pair in pairs:
        if np.asarray(pair.labels).ndim != 2:
            raise ValueError(f"{pair.name}: automatic modes are measured on 2D planes, got labels of shape "
                             f"{np.shape(pair.labels)}")
    if model is not None:
        advice = recommended(model) if advice is None else advice
        if name is None:
            name = model.source.name if model.source is not None else model.config.name
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    augmented: list[dict] = []
    embed_seconds: list[float] = []
    base_rows: list[dict] = []
    segment_baseline = watershed_segmenter(_BASELINE_MIN_AREA)
    for n, pair in enumerate(pairs, start=1):
        if modes:
            # The instance decoder's modes may read embeddings at magnification 1
            # (auto.modes.reads_native_scale): made here, they are timed as embedding,
            # not as the mode.
            native = all(mode in DECODER_MODES for mode in modes) and reads_native_scale(model)
            emb, seconds = _embed(pair.image, model, 1.0 if native else None, channel)
            embed_seconds.append(seconds)
            for mode in modes:
                start = time.perf_counter()
                pred = run(iter_segment_plane(emb, 0, mode, advice))
                rows[mode].append(_scored(pair, pred, time.perf_counter() - start))
            if augment:
                # The extra views are embedded inside the mode: their time counts as AIS's.
                start = time.perf_counter()
                pred = run(iter_segment_plane(emb, 0, "ais", advice, augment=True))
                augmented.append(_scored(pair, pred, time.perf_counter() - start))
            del emb
        if baseline:
            start = time.perf_counter()
            pred = segment_baseline(np.asarray(pair.image))
            base_rows.append(_scored(pair, pred, time.perf_counter() - start))
        yield EvalProgress(n, len(pairs), pair.name)
    results = []
    for mode in modes:
        settings = _mode_settings(advice, mode)
        best = " recommended" if mode == advice.mode else ""
        results.append(_result(
            f"{name} ({mode}{best})", rows[mode], mode=mode, recommended=mode == advice.mode, settings=settings,
            settings_text=_describe(mode, settings),
            embedding_seconds_per_plane=float(np.mean(embed_seconds)) if embed_seconds else float("nan"),
        ))
    if augment:
        settings = _mode_settings(advice, "ais")
        results.append(_result(
            f"{name} (ais, augmented)", augmented, mode="ais", recommended=False, augment=True, settings=settings,
            settings_text=_describe("ais", settings) + ", test-time augmentation",
            embedding_seconds_per_plane=float(np.mean(embed_seconds)),
        ))
    if baseline:
        results.append(_result(
            BASELINE, base_rows, mode="baseline", recommended=False, settings={"min_area": _BASELINE_MIN_AREA},
            settings_text="local threshold, distance watershed",
        ))
    return results


def evaluate_modes(
    pairs,
    model,
    modes: str | Sequence[str] | None = None,
    *,
    advice=None,
    baseline: bool = True,
    name: str | None = None,
    augment: bool = False,
    channel: str | None = None,
) -> list[dict]:
    """Every automatic mode of a model, with the settings it recommends, beside the
    classical baseline.

    Parameters
    ----------
    pairs
        Anything :func:`~napari_sam.evaluate.data.load_pairs` takes, with 2D labels.
    model
        A loaded SAM; None to measure the baseline alone.
    modes
        Which modes (:func:`select_modes`): None for every mode the model offers.
    advice
        :class:`~napari_sam.auto.recommend.Recommended` settings; None for what the
        model's checkpoint recommends.
    baseline
        Also measure the classical baseline (:func:`watershed_segmenter`).
    name
        The model's name in the rows (default: its checkpoint's name).
    augment
        Also AIS with test-time augmentation (:mod:`~napari_sam.auto.augmentation`), a
        row of its own after the modes (``augment=True`` in it); needs ``"ais"``.
    channel
        How RGB planes are read: ``"rgb"`` (the colours) or ``"haematoxylin"``
        (:mod:`~napari_sam.core.stain`); None as the model advises.

    Returns
    -------
    list of dict
        One result per mode, in :data:`~napari_sam.auto.modes.MODES` order, then the
        baseline's; each as :func:`evaluate_automatic`'s (``seconds`` per image: the
        mode's own work on the embedded plane) plus ``mode``, ``recommended`` (whether it
        is the model's recommended mode), ``settings`` (dict), ``settings_text`` and, for
        SAM's modes, ``embedding_seconds_per_plane`` (mean time to embed an image, shared
        by all of them).

    Raises
    ------
    ValueError
        A mode that is unknown or that the model does not offer (before any work),
        ``augment`` without ``"ais"`` among the modes, or a pair that is not a 2D plane.
    """
    return run_to_end(iter_evaluate_modes(pairs, model, modes, advice=advice, baseline=baseline, name=name,
                                          augment=augment, channel=channel))
