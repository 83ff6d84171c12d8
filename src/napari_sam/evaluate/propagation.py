"""Propagation quality: a callable that spreads a mask from one plane through a volume,
started from each object's ground-truth mask on its middle plane, scored by the mean 3D
IoU. :func:`sam_propagator` is the plugin's propagation with SAM, :func:`sam2_propagator`
with SAM 2's memory, :func:`watershed_propagator` their classical counterpart."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from ..core.masks import PlaneMask, iou
from .baseline import WatershedBaseline
from .data import sample_objects

__all__ = ["evaluate_propagation", "evaluate_propagation_volumes", "sam2_propagator", "sam_propagator",
           "watershed_propagator"]


def evaluate_propagation(
    propagate: Callable[[np.ndarray, int, np.ndarray], np.ndarray],
    volume,
    labels,
    *,
    max_objects: int | None = None,
    seed: int = 0,
    min_area: int = 1,
    name: str = "propagation",
) -> dict:
    """Mean 3D IoU of a mask propagation started from each object's middle plane.

    Parameters
    ----------
    propagate
        ``propagate(volume, start_plane, mask) -> volume_mask``: given the (Z, H, W)
        volume, a plane index and the object's (H, W) mask on that plane, returns the
        object's (Z, H, W) mask.
    volume
        (Z, H, W) image.
    labels
        (Z, H, W) ground-truth instance labels.
    max_objects, seed
        Sample this many objects (all when None).
    min_area
        Objects of fewer voxels are skipped.
    name
        Name of the method in the results.

    Returns
    -------
    dict
        ``kind="propagation"``, ``method``, ``objects``, ``mean_iou`` and
        ``per_object`` (``id``, ``start_plane``, ``iou``).
    """
    volume, labels = np.asarray(volume), np.asarray(labels)
    if labels.ndim != 3 or labels.dtype.kind not in "iub":
        raise ValueError(f"labels must be a (Z, H, W) integer volume, got {labels.dtype} {labels.shape}")
    if volume.shape[:3] != labels.shape:
        raise ValueError(f"volume {volume.shape} and labels {labels.shape} do not cover the same voxels")
    rng = np.random.default_rng(seed)
    ids = sample_objects(labels, min_area, max_objects, rng)
    slices = ndimage.find_objects(labels.astype(np.int64, copy=False))
    per_object = []
    for i in ids:
        sl = slices[int(i) - 1]
        obj = labels == i
        zs = sl[0].start + np.flatnonzero(obj[sl].any(axis=(1, 2)))
        start = int(zs[len(zs) // 2])  # the middle of the planes it occupies
        result = np.asarray(propagate(volume, start, obj[start].copy()))
        if result.shape != labels.shape:
            raise ValueError(f"propagate returned shape {result.shape}, expected {labels.shape}")
        # one row of all voxels: iou() sums over the last two axes, the 3D IoU over all three
        score = iou(result.reshape(1, -1), obj.reshape(1, -1), empty=1.0)
        per_object.append({"id": int(i), "start_plane": start, "iou": score})
    return _result(name, per_object)


def _result(name: str, per_object: list[dict]) -> dict:
    mean = float(np.mean([r["iou"] for r in per_object])) if per_object else float("nan")
    return {"kind": "propagation", "method": name, "objects": len(per_object), "mean_iou": mean,
            "per_object": per_object}


def evaluate_propagation_volumes(propagate: Callable[[np.ndarray, int, np.ndarray], np.ndarray], volumes, *,
                                 max_objects: int | None = None, seed: int = 0, min_area: int = 1,
                                 name: str = "propagation") -> dict:
    """:func:`evaluate_propagation` over several volumes, as one result whose mean 3D IoU
    weighs every object alike.

    Parameters
    ----------
    volumes
        :class:`~napari_sam.evaluate.data.EvalPair` items (``image`` (Z, H, W),
        ``labels`` (Z, H, W), ``name``).
    propagate, max_objects, seed, min_area, name
        As for :func:`evaluate_propagation`; ``max_objects`` and ``seed`` apply to each
        volume.

    Returns
    -------
    dict
        As :func:`evaluate_propagation` returns it, each of ``per_object`` also naming its
        ``volume``.
    """
    per_object = []
    for pair in volumes:
        r = evaluate_propagation(propagate, pair.image, pair.labels, max_objects=max_objects, seed=seed,
                                 min_area=min_area, name=name)
        per_object += [o | {"volume": pair.name} for o in r["per_object"]]
    return _result(name, per_object)


def sam_propagator(model, settings=None, magnification=None,
                   channel: str | None = None) -> Callable[[np.ndarray, int, np.ndarray], np.ndarray]:
    """A ``propagate`` for :func:`evaluate_propagation`: SAM carrying the mask from plane
    to plane (:func:`~napari_sam.core.propagation.propagate` with ``settings``), as the
    plugin propagates. Each volume is embedded once, however many objects it holds, at
    ``magnification`` (:class:`~napari_sam.core.embeddings.Embeddings`; None: the
    model's advice); an RGB volume (Z, Y, X, 3) is read as ``channel`` says (``"rgb"``,
    ``"haematoxylin"``; None: the model's advice)."""
    from ..core.embeddings import Embeddings
    from ..core.propagation import PropagationSettings, propagate

    settings = settings or PropagationSettings()
    held: dict[int, tuple] = {}

    def run(volume: np.ndarray, start: int, mask: np.ndarray) -> np.ndarray:
        if id(volume) not in held:
            held.clear()  # the volume object is kept with its embeddings, so its id stays its own
            axes = "ZYXC" if volume.ndim == 4 else "ZYX"
            held[id(volume)] = (volume, Embeddings(volume, model, cache=False, axes=axes, channel=channel,
                                                          magnification=magnification))
        emb = held[id(volume)][1]
        out = np.zeros(volume.shape[:3], bool)
        out[start] = mask
        if mask.sum() < settings.min_area:
            return out  # too small to start from (the plugin refuses it too): the start plane alone
        for step in propagate(emb, start, PlaneMask.from_full(mask), settings=settings):
            if step.mask is not None:
                out[step.plane[0]] = step.mask.to_full(mask.shape)
        return out

    return run


def sam2_propagator(model, settings=None) -> Callable[[np.ndarray, int, np.ndarray], np.ndarray]:
    """A ``propagate`` for :func:`evaluate_propagation`: SAM 2 carrying the mask with its
    memory (:func:`~napari_sam.core.memory_propagation.propagate_objects` with ``settings``,
    a :class:`~napari_sam.core.memory_propagation.MemorySettings`), as the plugin propagates
    with a SAM 2. Each volume's features are computed once, however many objects it holds."""
    from ..core.memory_propagation import MemorySettings, propagate_objects
    from ..core.sam2_features import Sam2Features

    settings = settings or MemorySettings()
    held: dict[int, tuple] = {}

    def run(volume: np.ndarray, start: int, mask: np.ndarray) -> np.ndarray:
        if id(volume) not in held:
            held.clear()  # the volume object is kept with its features, so its id stays its own
            axes = "ZYXC" if volume.ndim == 4 else "ZYX"  # a SAM 2 reads RGB as its colours
            held[id(volume)] = (volume, Sam2Features(volume, model, cache=False, axes=axes))
        features = held[id(volume)][1]
        out = np.zeros(volume.shape[:3], bool)
        out[start] = mask
        if not mask.any():
            return out
        for step in propagate_objects(features, {1: {start: PlaneMask.from_full(mask)}}, settings=settings):
            if 1 in step.masks:
                out[step.plane[0]] = step.masks[1].to_full(mask.shape)
        return out

    return run


def watershed_propagator(settings=None) -> Callable[[np.ndarray, int, np.ndarray], np.ndarray]:
    """The classical counterpart of :func:`sam_propagator`: on each next plane, the
    seeded watershed baseline answers the previous mask's deepest point and its box grown
    by 10 %; it stops when the answer is too small or overlaps the previous plane too
    little. Those are its fixed settings unless ``settings`` says otherwise (SAM's
    defaults changed to a shrunk box alone and a contrast rule; the baseline stays the
    one the published comparisons were made against)."""
    from ..core.propagation import PropagationSettings, next_prompt

    settings = settings or PropagationSettings(use_box=True, use_points=True, points=1, box_margin=0.1,
                                               min_area=10, min_consecutive_iou=0.3)
    ws = WatershedBaseline()

    def run(volume: np.ndarray, start: int, mask: np.ndarray) -> np.ndarray:
        out = np.zeros(volume.shape[:3], bool)
        out[start] = mask
        for direction in (1, -1):
            previous, z = mask, start + direction
            while 0 <= z < volume.shape[0] and previous.any():
                # the prompt SAM's propagation would send, from the same helper
                prompt = next_prompt(PlaneMask.from_full(previous).cropped(), settings, previous.shape)
                ws.set_image(volume[z])
                answer = ws.predict(**prompt.predict_kwargs())
                if answer.sum() < settings.min_area or iou(answer, previous, empty=1.0) < settings.min_consecutive_iou:
                    break
                out[z] = answer
                previous, z = answer, z + direction
        return out

    return run
