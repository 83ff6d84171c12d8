"""Detector-prompted mode: one object per box, through SAM.

Boxes come from a classical detector (:func:`detect_boxes`: Otsu threshold and
connected components, or Laplacian-of-Gaussian blobs), from a label image
(:func:`boxes_from_labels`, e.g. a rough classical segmentation to refine) or by hand.
Unlike grid mode, an object larger than a tile is segmented whole, across tiles
(:meth:`~napari_sam.core.embeddings.Embeddings.segment`).

Coordinates: boxes are (x0, y0, x1, y1) = (column, row) pixels; label images (row, col).
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
from scipy import ndimage

from ..core.embeddings import Embeddings
from ..core.preprocess import Normalization
from ..core.prompts import Prompt
from .candidates import Candidate, masks_to_labels, stability_score
from .decoding import UPSCALE_CHUNK, decoder, full_logits, plane_embeddings
from .link import link_planes
from .results import AutomaticResult, Progress, run

__all__ = ["DETECTORS", "boxes_from_labels", "detect_boxes", "iter_from_boxes", "iter_refine_labels",
           "segment_detections"]

DETECTORS = ("otsu", "log")
"""The classical detectors whose boxes the ``"boxes"`` mode answers (:func:`detect_boxes`)."""


def boxes_from_labels(labels, min_area: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Bounding boxes of the objects of a label image.

    Parameters
    ----------
    labels
        (H, W) integer instance labels, 0 = background.
    min_area
        Objects of fewer pixels are skipped.

    Returns
    -------
    boxes : numpy.ndarray
        (N, 4) float64 (x0, y0, x1, y1), x1 and y1 the last column and row (as SAM's
        training boxes), widened by one pixel where an object is one pixel thin.
    ids : numpy.ndarray
        (N,) the label of each box.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iub":
        raise ValueError(f"labels must be a 2D integer image, got shape {labels.shape} and dtype {labels.dtype}")
    H, W = labels.shape
    slices = ndimage.find_objects(labels.astype(np.int64, copy=False))
    counts = np.bincount(labels.ravel().astype(np.int64)) if labels.size else np.zeros(1, int)
    boxes, ids = [], []
    for i, sl in enumerate(slices, start=1):
        if sl is None or counts[i] < max(min_area, 1):
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop - 1, sl[1].start, sl[1].stop - 1
        # a box needs x1 > x0 and y1 > y0 (as core.masks.prompt_box, here from the
        # object's slices: one pass over the image for all objects)
        if x1 == x0:
            x0, x1 = (x0, x0 + 1) if x0 + 1 < W else (x0 - 1, x0)
        if y1 == y0:
            y0, y1 = (y0, y0 + 1) if y0 + 1 < H else (y0 - 1, y0)
        boxes.append((x0, y0, x1, y1))
        ids.append(i)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(ids, dtype=np.int64)


def detect_boxes(
    image,
    method: str = "otsu",
    min_area: int = 25,
    sigma: float = 1.0,
    min_sigma: float = 2.0,
    max_sigma: float = 20.0,
    threshold: float = 0.05,
) -> np.ndarray:
    """Boxes of bright objects found by a classical detector.

    Parameters
    ----------
    image
        (H, W) plane (RGB is averaged to gray).
    method
        ``"otsu"``: Gaussian smoothing, Otsu threshold, connected components of at least
        ``min_area`` pixels. ``"log"``: Laplacian-of-Gaussian blobs
        (:func:`skimage.feature.blob_log`), each blob's box spanning its radius
        (sigma times sqrt 2).
    min_area
        Smallest component (``"otsu"``), or smallest box area (``"log"``), in pixels.
    sigma
        Smoothing before the threshold (``"otsu"``).
    min_sigma, max_sigma, threshold
        Blob scales and absolute threshold on the [0, 1]-scaled image (``"log"``).

    Returns
    -------
    numpy.ndarray
        (N, 4) float64 (x0, y0, x1, y1) boxes.
    """
    from skimage.filters import gaussian, threshold_otsu

    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        image = image[..., :3].mean(axis=-1)
    if image.ndim != 2:
        raise ValueError(f"detect_boxes takes one plane (H, W) or (H, W, 3|4), got shape {image.shape}")
    gray = image.astype(np.float64)
    lo, hi = float(gray.min()), float(gray.max())
    if hi <= lo:
        return np.zeros((0, 4))
    gray = (gray - lo) / (hi - lo)
    if method == "otsu":
        smooth = gaussian(gray, sigma=sigma) if sigma > 0 else gray
        lab, _ = ndimage.label(smooth > threshold_otsu(smooth))
        return boxes_from_labels(lab, min_area)[0]
    if method == "log":
        from skimage.feature import blob_log

        blobs = blob_log(gray, min_sigma=min_sigma, max_sigma=max_sigma, threshold=threshold)
        H, W = gray.shape
        boxes = []
        for y, x, s in blobs:
            r = max(s * np.sqrt(2), 1.0)
            b = (max(x - r, 0), max(y - r, 0), min(x + r, W - 1), min(y + r, H - 1))
            if (b[2] - b[0]) * (b[3] - b[1]) >= min_area and b[2] > b[0] and b[3] > b[1]:
                boxes.append(b)
        return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    raise ValueError(f"method must be 'otsu' or 'log', not {method!r}")


def iter_from_boxes(
    embeddings: Embeddings, plane, boxes, batch_size: int = 64, min_area: int = 0
) -> Generator[Progress, None, AutomaticResult]:
    """One object per box, through SAM, painted into a label image.

    Boxes that lie within one tile's embedded region are decoded in batches on that tile
    (the tile whose interior holds the box's centre); a box reaching beyond it is
    segmented across tiles by
    :meth:`~napari_sam.core.embeddings.Embeddings.segment`.

    Parameters
    ----------
    embeddings
        The image's embeddings.
    plane
        Flat plane number or (t, z) tuple.
    boxes
        (N, 4) (x0, y0, x1, y1) in plane pixels (:func:`detect_boxes`,
        :func:`boxes_from_labels`, or drawn).
    batch_size
        Boxes decoded at once.
    min_area
        Objects left with fewer pixels are dropped.

    Yields
    ------
    Progress
        After each batch (``stage="boxes"``; ``done``/``total`` count boxes).

    Returns
    -------
    AutomaticResult
        Objects in the order of :func:`~napari_sam.auto.candidates.masks_to_labels`
        (largest first); ``stability`` is NaN for objects segmented across tiles.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) as (x0, y0, x1, y1), got {boxes.shape}")
    flat = embeddings.source.flat_index(plane)
    candidates = yield from iter_box_candidates(embeddings, flat, boxes, batch_size)
    return masks_to_labels(embeddings.grid.shape, candidates, min_area)


def iter_box_candidates(
    embeddings: Embeddings, flat: int, boxes: np.ndarray, batch_size: int, stage: str = "boxes"
) -> Generator[Progress, None, list[Candidate]]:
    """SAM's mask of each (N, 4) box of a plane (see :func:`iter_from_boxes`), as
    candidates in plane coordinates; shared with APG's refinement by boxes."""
    grid = embeddings.grid
    H, W = grid.shape
    groups: dict[tuple[int, int], list[int]] = {}
    across: list[int] = []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        cx, cy = min(max((x0 + x1) / 2, 0), W - 1), min(max((y0 + y1) / 2, 0), H - 1)
        tile = grid.tile_at(cx, cy)
        oy0, oy1, ox0, ox1 = tile.outer
        if x0 >= ox0 and y0 >= oy0 and x1 <= ox1 and y1 <= oy1:
            groups.setdefault(tile.index, []).append(i)
        else:
            across.append(i)
    found = yield from iter_tile_prompts(embeddings, flat, groups, batch_size, len(boxes), boxes=boxes, stage=stage)
    candidates = [c for _, c in found]
    done = len(boxes) - len(across)
    for i in across:
        obj = embeddings.segment(flat, Prompt.make(box=boxes[i]))
        if obj.area:
            candidates.append(Candidate(obj.region, obj.mask, float(obj.iou)))
        done += 1
        yield Progress(done, len(boxes), flat, None, stage)
    return candidates


def iter_tile_prompts(
    embeddings: Embeddings,
    flat: int,
    groups: dict[tuple[int, int], list[int]],
    batch_size: int,
    total: int,
    boxes: np.ndarray | None = None,
    points: np.ndarray | None = None,
    multimask: bool = False,
    stage: str = "boxes",
) -> Generator[Progress, None, list[tuple[int, Candidate]]]:
    """SAM's mask for each prompt of each tile's group, decoded in batches on the tile's
    embedding (shared by the detector-prompted mode and APG).

    ``groups`` maps a tile index to the numbers of its prompts: rows of ``boxes``
    ((N, 4) x0, y0, x1, y1) and/or of ``points`` ((N, 2) x, y, one foreground point
    each), in plane pixels and inside the tile's embedded region. With ``multimask`` the
    candidate of highest predicted IoU is kept, as SAM chooses. Yields Progress after
    each batch (``done`` counts prompts out of ``total``); returns (prompt number,
    candidate in plane coordinates) pairs, without empty masks.
    """
    predictor = decoder(embeddings)
    threshold = float(embeddings.model.mask_threshold)
    found: list[tuple[int, Candidate]] = []
    done = 0
    for index, members in groups.items():
        tile = embeddings.grid[index]
        oy, ox = tile.outer[0], tile.outer[2]
        predictor.set_embedding(embeddings.embedding_for(flat, index))
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            prompt: dict = {}
            if boxes is not None:
                prompt["boxes"] = boxes[chunk] - (ox, oy, ox, oy)
            if points is not None:
                prompt["points"] = (points[chunk] - (ox, oy))[:, None, :]
            pred = predictor.predict_batch(**prompt, multimask=multimask)
            best = pred.iou.argmax(axis=1)
            rows = np.arange(len(chunk))
            low, ious = pred.low_res_logits[rows, best], pred.iou[rows, best]
            for c0 in range(0, len(chunk), UPSCALE_CHUNK):
                logits = full_logits(predictor, low[c0 : c0 + UPSCALE_CHUNK])
                stab = stability_score(logits, 1.0, threshold)
                for j in range(logits.shape[0]):
                    candidate = Candidate.of(logits[j] > threshold, (oy, ox), float(ious[c0 + j]), float(stab[j]))
                    if candidate is not None:
                        found.append((chunk[c0 + j], candidate))
            done += len(chunk)
            yield Progress(done, total, flat, index, stage)
    return found


def segment_detections(
    image,
    model,
    boxes=None,
    labels=None,
    *,
    method: str = "otsu",
    min_area: int = 25,
    channel: int | None = None,
    tile: int | None = None,
    halo: int | None = None,
    normalization: Normalization = Normalization(),
    batch_size: int = 64,
) -> AutomaticResult:
    """Detector-prompted segmentation of one 2D plane in one call.

    The boxes come from ``boxes`` if given, else from the objects of the label image
    ``labels`` (e.g. a rough classical segmentation to refine), else from
    :func:`detect_boxes` with ``method`` and ``min_area``.

    Returns
    -------
    AutomaticResult
    """
    emb = plane_embeddings(image, model, channel, tile, halo, normalization)
    if boxes is None and labels is not None:
        boxes = boxes_from_labels(labels, min_area)[0]
    elif boxes is None:
        plane = np.asarray(image)
        if channel is not None:
            plane = plane[..., channel]
        boxes = detect_boxes(plane, method=method, min_area=min_area)
    return run(iter_from_boxes(emb, 0, boxes, batch_size=batch_size, min_area=min_area))


def iter_refine_labels(embeddings: Embeddings, planes, rough, link_iou: float = 0.25, **settings):
    """Mode "labels": the box of each object of a rough segmentation through SAM, plane by
    plane, linked into 3D objects; a generator of :class:`Progress` that returns the
    (Z, H, W) labels of ``planes``.

    ``rough``: (planes..., H, W) labels indexed by the plane keys in ``planes``;
    ``settings``: those of :func:`iter_from_boxes`."""
    found = []
    for k, plane in enumerate(planes, start=1):
        boxes = boxes_from_labels(np.asarray(rough[plane]))[0]
        found.append((yield from iter_from_boxes(embeddings, plane, boxes, **settings)).labels)
        yield Progress(k, len(planes), embeddings.source.flat_index(plane), None, "planes")
    return link_planes(found, link_iou)
