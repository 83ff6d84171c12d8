"""Automatic instance segmentation of a plane, and linking of plane instances into 3D.

Three ways to segment every object of a plane without clicking:

* **Grid mode** (:func:`iter_grid`, :func:`segment_grid`), SAM's "segment everything": a
  regular grid of single-point prompts goes through the decoder in batches, each point
  giving three candidate masks; candidates are kept when their predicted IoU and their
  stability score are high, duplicates are removed by box non-maximum suppression,
  small holes and islands are cleaned, and the survivors are painted into a label image.
* **Detector-prompted mode** (:func:`iter_from_boxes`, :func:`segment_detections`): boxes
  from a classical detector (:func:`detect_boxes`: Otsu threshold and connected
  components, or Laplacian-of-Gaussian blobs), from a label image
  (:func:`boxes_from_labels`) or given by hand; each box becomes one object through SAM.
* **3D** (:func:`link_planes`): instances of consecutive planes are matched by overlap
  (Hungarian assignment on IoU) and given one id per 3D object.

Large planes are answered tile by tile through
:class:`~napari_sam.core.embeddings.Embeddings`. In grid mode every tile places its grid
of points in its *interior* only (the interiors partition the plane, so every pixel is
covered by exactly one tile's grid) and answers them on its embedded region (interior
plus halo), so an object near an interior border is still seen whole. **A candidate
mask that touches the edge of the embedded region where the plane continues is
dropped**: it is an object cut by the tile's field of view. Such an object is also
prompted by the neighbouring tile, which sees it whole as long as it reaches no further
than the halo into the first tile's interior; the duplicates that two tiles produce for
an object near their border are removed by the same non-maximum suppression that
removes duplicates within a tile (it runs on all tiles' candidates in plane
coordinates). Objects wider than a halo and crossing a border may therefore be lost
in grid mode; the detector-prompted mode segments them across tiles
(:meth:`~napari_sam.core.embeddings.Embeddings.segment`).

Long work is written as generators that yield :class:`Progress` and *return* their result
(``StopIteration.value``); :func:`run` drives one to the end, and the ``segment_*``
functions are the one-call versions.

Coordinates: prompts are (x, y) = (column, row) pixels, boxes (x0, y0, x1, y1); label
images and the internal mask regions are (row, col) arrays.
"""

from __future__ import annotations

import warnings
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .embeddings import Embeddings
from .predictor import Predictor
from .preprocess import Normalization
from .tiling import Tile

__all__ = [
    "AutomaticResult",
    "GridConfig",
    "Progress",
    "Recommended",
    "box_nms",
    "boxes_from_labels",
    "clean_mask",
    "detect_boxes",
    "grid_points",
    "iter_from_boxes",
    "iter_grid",
    "iter_grid_volume",
    "link_planes",
    "masks_to_labels",
    "recommended",
    "run",
    "segment_detections",
    "segment_grid",
    "segment_grid_volume",
    "stability_score",
]


# -- results and settings -----------------------------------------------------------------
@dataclass(frozen=True)
class Recommended:
    """How to segment everything with a given model, as measured for it.

    Attributes
    ----------
    mode
        ``"auto"`` (grid of points) or ``"boxes"`` (detector boxes, each through SAM).
    detector
        :func:`detect_boxes` method for ``"boxes"``.
    grid
        Filters for ``"auto"``.
    """

    mode: str = "auto"
    detector: str = "otsu"
    grid: "GridConfig" = field(default_factory=lambda: GridConfig())


def recommended(model) -> Recommended:
    """What to use to segment everything with a model.

    SAM's own settings (grid mode, predicted IoU above 0.88, stability above 0.95) for
    every model, except the embedded default model: it never predicts that confidently,
    so nothing would pass. On the held-out DSB images it measured mSA 0.342 / AP50 0.571
    with Laplacian-of-Gaussian boxes against 0.153 / 0.366 in grid mode with relaxed
    filters (IoU 0.6, stability 0.8) and 0.287 / 0.423 for Otsu components alone
    (docs/volumes.md); the choice was made on DSB training images, where the order was
    the same. A checkpoint may carry its own advice as metadata ``"automatic"``, a dict
    of these fields (``grid`` as GridConfig's fields).

    Parameters
    ----------
    model
        A loaded SAM (:func:`~napari_sam.core.models.load_model`).

    Returns
    -------
    Recommended
        SAM's settings when the checkpoint's advice is malformed (with a warning).
    """
    from .models import DEFAULT_MODEL

    advice = (getattr(model, "checkpoint_metadata", None) or {}).get("automatic") or {}
    source = getattr(model, "source", None)
    if not advice and source is not None and source.name == DEFAULT_MODEL:
        advice = {"mode": "boxes", "detector": "log", "grid": {"pred_iou_thresh": 0.6, "stability_thresh": 0.8}}
    try:
        advice = dict(advice)
        grid = GridConfig(**dict(advice.pop("grid", {})))
        out = Recommended(grid=grid, **advice)
        if out.mode not in ("auto", "boxes") or out.detector not in ("otsu", "log"):
            raise ValueError(f"mode {out.mode!r}, detector {out.detector!r}")
    except (TypeError, ValueError) as err:  # a checkpoint is untrusted input
        warnings.warn(f"ignoring the checkpoint's advice on automatic segmentation ({err})", RuntimeWarning, stacklevel=2)
        return Recommended()
    return out


@dataclass(frozen=True)
class GridConfig:
    """Settings of grid mode (defaults as SAM's automatic mask generator).

    Attributes
    ----------
    points_per_side
        Grid points along each side of a tile's interior (the whole plane when it is one
        tile): ``points_per_side ** 2`` prompts per tile.
    batch_size
        Point prompts decoded at once (memory grows with it: 3 low-res masks per point).
    pred_iou_thresh
        Candidates whose predicted IoU is not above this are dropped.
    stability_thresh
        Candidates whose stability score is below this are dropped.
    stability_offset
        Logit offset of the stability score (see :func:`stability_score`).
    nms_iou
        Box IoU above which the lower-scoring of two candidates is a duplicate.
    min_area
        Holes and islands smaller than this (pixels) are cleaned from every mask, and
        objects left smaller than this are dropped; 0 keeps everything.
    """

    points_per_side: int = 32
    batch_size: int = 64
    pred_iou_thresh: float = 0.88
    stability_thresh: float = 0.95
    stability_offset: float = 1.0
    nms_iou: float = 0.7
    min_area: int = 25

    def __post_init__(self):
        if self.points_per_side < 1 or self.batch_size < 1:
            raise ValueError(
                f"points_per_side and batch_size must be >= 1, got {self.points_per_side} and {self.batch_size}"
            )
        if not 0 < self.nms_iou <= 1:
            raise ValueError(f"nms_iou must be in (0, 1], got {self.nms_iou}")
        if self.stability_offset < 0 or self.min_area < 0:
            raise ValueError(
                f"stability_offset and min_area must be >= 0, got {self.stability_offset} and {self.min_area}"
            )


@dataclass(frozen=True)
class Progress:
    """Progress of a long computation.

    Attributes
    ----------
    done, total
        Units finished (tiles, batches of boxes, or planes), out of ``total``.
    plane
        Flat plane number being worked on.
    tile
        (row, col) of the tile just finished, or None.
    stage
        What the units are: ``"tiles"``, ``"boxes"`` or ``"planes"``.
    """

    done: int
    total: int
    plane: int
    tile: tuple[int, int] | None = None
    stage: str = "tiles"


@dataclass
class AutomaticResult:
    """Objects found on a plane.

    Object ``i + 1`` of :attr:`labels` is described by entry ``i`` of every array.

    Attributes
    ----------
    labels
        (H, W) uint32 instance labels, 0 = background, ids 1..n with no gaps, numbered
        from the largest object to the smallest.
    iou
        (n,) predicted IoU of each object's mask.
    stability
        (n,) stability score (NaN where it was not computed).
    area
        (n,) pixels of each object in :attr:`labels`.
    """

    labels: np.ndarray
    iou: np.ndarray
    stability: np.ndarray
    area: np.ndarray

    @property
    def n_objects(self) -> int:
        return int(len(self.iou))

    def scores(self) -> list[dict]:
        """One JSON-able dict per object: ``{"id", "iou", "stability", "area"}``."""
        return [
            {
                "id": i + 1,
                "iou": float(self.iou[i]),
                "stability": None if np.isnan(self.stability[i]) else float(self.stability[i]),
                "area": int(self.area[i]),
            }
            for i in range(self.n_objects)
        ]


@dataclass
class _Candidate:
    """A mask as a crop of the plane: ``region`` is (y0, y1, x0, x1)."""

    region: tuple[int, int, int, int]
    mask: np.ndarray
    iou: float
    stability: float = float("nan")
    area: int = field(init=False)

    def __post_init__(self):
        self.area = int(self.mask.sum())

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) pixel extent, end exclusive."""
        y0, y1, x0, x1 = self.region
        return x0, y0, x1, y1


def run(generator: Generator):
    """Drive one of the ``iter_*`` generators to its end and return its result."""
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value


# -- building blocks -----------------------------------------------------------------------
def box_nms(boxes, scores, iou_threshold: float = 0.7) -> np.ndarray:
    """Greedy non-maximum suppression of boxes.

    The highest-scoring box is kept, every remaining box overlapping it with an IoU above
    ``iou_threshold`` is dropped, and so on. Equal scores keep the earlier box.

    Parameters
    ----------
    boxes
        (N, 4) as (x0, y0, x1, y1); area is ``(x1 - x0) * (y1 - y0)`` (use end-exclusive
        pixel extents for masks).
    scores
        (N,) higher is better.
    iou_threshold
        Boxes overlapping a kept one by more than this are suppressed.

    Returns
    -------
    numpy.ndarray
        Indices of the kept boxes, best first.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if np.size(boxes) else np.zeros((0, 4))
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
    if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
        raise ValueError("boxes must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = w * h
        union = area[i] + area[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def stability_score(logits, offset: float = 1.0, threshold: float = 0.0) -> np.ndarray:
    """How little a mask changes when its logit threshold moves: the IoU of the mask
    thresholded at ``threshold + offset`` with the one thresholded at ``threshold - offset``.

    The first is contained in the second, so the IoU is a ratio of pixel counts. A mask
    with sharp edges scores near 1; a blurry one, whose extent depends on the threshold,
    scores low.

    Parameters
    ----------
    logits
        (..., H, W) mask logits.
    offset
        Logit offset (SAM: 1.0).
    threshold
        The mask threshold (0 for SAM).

    Returns
    -------
    numpy.ndarray
        (...) scores in [0, 1]; 1 for a mask that is empty at both thresholds.
    """
    t = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    if t.ndim < 2:
        raise ValueError(f"logits must have at least 2 dimensions (H, W), got shape {tuple(t.shape)}")
    inner = (t > threshold + offset).sum(dim=(-2, -1), dtype=torch.int64)
    outer = (t > threshold - offset).sum(dim=(-2, -1), dtype=torch.int64)
    ratio = inner.double() / outer.clamp(min=1).double()
    score = torch.where(outer > 0, ratio, torch.ones_like(ratio))
    return score.numpy()


def grid_points(region: tuple[int, int, int, int], points_per_side: int) -> np.ndarray:
    """A regular grid of (x, y) points in a (y0, y1, x0, x1) region.

    Points sit at the centres of ``points_per_side`` equal cells along each side (as
    SAM's grid), so none lies on the region's edge.

    Returns
    -------
    numpy.ndarray
        (points_per_side ** 2, 2) float64 (x, y), row-major.
    """
    if points_per_side < 1:
        raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
    y0, y1, x0, x1 = region
    if y1 <= y0 or x1 <= x0:
        raise ValueError(f"empty region {region} (y0, y1, x0, x1)")
    frac = (np.arange(points_per_side) + 0.5) / points_per_side
    xs = x0 + frac * (x1 - x0)
    ys = y0 + frac * (y1 - y0)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def _remove_small(mask: np.ndarray, min_area: int, holes: bool) -> np.ndarray:
    """skimage's remove_small_holes / remove_small_objects for areas below ``min_area``
    (the keyword changed from ``min_size`` / ``area_threshold`` to ``max_size`` in
    scikit-image 0.26; both are supported)."""
    from skimage.morphology import remove_small_holes, remove_small_objects

    fn = remove_small_holes if holes else remove_small_objects
    try:
        return fn(mask, max_size=min_area - 1)  # removes areas <= max_size
    except TypeError:
        return fn(mask, min_area)  # older: removes areas < min_size / area_threshold


def clean_mask(mask, min_area: int) -> np.ndarray:
    """Fill holes and remove islands smaller than ``min_area`` pixels.

    Parameters
    ----------
    mask
        (H, W) bool.
    min_area
        Holes and islands of fewer pixels go; 0 or 1 leaves the mask as it is.

    Returns
    -------
    numpy.ndarray
        (H, W) bool, a new array.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D (H, W), got shape {mask.shape}")
    if min_area <= 1 or not mask.any():
        return mask.copy()
    return _remove_small(_remove_small(mask, min_area, holes=True), min_area, holes=False)


def _crop(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    oy, ox = offset
    return (int(oy + r0), int(oy + r1), int(ox + c0), int(ox + c1)), mask[r0:r1, c0:c1]


def masks_to_labels(
    shape: tuple[int, int], candidates: Sequence[_Candidate], min_area: int = 0
) -> AutomaticResult:
    """Paint object masks into one label image without overlaps.

    Larger objects are painted first and smaller ones over them (as micro-sam does), so
    an object lying on a larger one stays whole and the larger one loses those pixels;
    objects left with fewer than ``min_area`` pixels (or none) are dropped, and ids are
    renumbered 1..n from the largest object down.
    """
    labels = np.zeros(shape, np.uint32)
    order = sorted(range(len(candidates)), key=lambda i: -candidates[i].area)
    for k, i in enumerate(order, start=1):
        c = candidates[i]
        y0, y1, x0, x1 = c.region
        labels[y0:y1, x0:x1][c.mask] = k
    area = np.bincount(labels.ravel(), minlength=len(order) + 1)[1:]
    survivors = [k for k in range(1, len(order) + 1) if area[k - 1] > 0 and area[k - 1] >= max(min_area, 1)]
    lut = np.zeros(len(order) + 1, np.uint32)
    lut[survivors] = np.arange(1, len(survivors) + 1, dtype=np.uint32)
    labels = lut[labels]
    kept = [candidates[order[k - 1]] for k in survivors]
    return AutomaticResult(
        labels=labels,
        iou=np.array([c.iou for c in kept], dtype=np.float64),
        stability=np.array([c.stability for c in kept], dtype=np.float64),
        area=np.array([area[k - 1] for k in survivors], dtype=np.int64),
    )


# -- grid mode -----------------------------------------------------------------------------
def _upscaler(predictor: Predictor):
    model = predictor.model
    emb = predictor.embedding

    @torch.inference_mode()
    def upscale(low: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(low[:, None], device=model.device)
        return model.postprocess_masks(t, emb.input_size, emb.original_size)[:, 0].float().cpu().numpy()

    return upscale


def _cut_by_view(mask: np.ndarray, tile: Tile, plane_shape: tuple[int, int]) -> bool:
    """Whether the mask touches an edge of the tile's embedded region beyond which the
    plane continues (the object may go on outside what this tile saw)."""
    y0, y1, x0, x1 = tile.outer
    H, W = plane_shape
    return bool(
        (y0 > 0 and mask[0].any())
        or (y1 < H and mask[-1].any())
        or (x0 > 0 and mask[:, 0].any())
        or (x1 < W and mask[:, -1].any())
    )


# Full-size logits are made for this many candidates at a time: 16 x 1024^2 float32 is
# 64 MiB, whatever the batch size.
_UPSCALE_CHUNK = 16


def _tile_candidates(predictor: Predictor, tile: Tile, plane_shape, config: GridConfig) -> list[_Candidate]:
    points = grid_points(tile.inner, config.points_per_side)
    oy, ox = tile.outer[0], tile.outer[2]
    local = points - (ox, oy)
    threshold = float(predictor.model.mask_threshold)
    upscale = _upscaler(predictor)
    found: list[_Candidate] = []
    for start in range(0, len(local), config.batch_size):
        batch = local[start : start + config.batch_size]
        pred = predictor.predict_batch(
            points=batch[:, None, :], labels=np.ones((len(batch), 1), np.int64), multimask=True
        )
        iou = pred.iou.reshape(-1)
        low = pred.low_res_logits.reshape(-1, *pred.low_res_logits.shape[-2:])
        # The predicted IoU is free; only its survivors are upscaled for the stability
        # score, which SAM computes on full-size logits.
        idx = np.flatnonzero(iou > config.pred_iou_thresh)
        for c0 in range(0, len(idx), _UPSCALE_CHUNK):
            chunk = idx[c0 : c0 + _UPSCALE_CHUNK]
            logits = upscale(low[chunk])
            stab = stability_score(logits, config.stability_offset, threshold)
            for j, k in enumerate(chunk):
                if stab[j] < config.stability_thresh:
                    continue
                mask = logits[j] > threshold
                if not mask.any() or _cut_by_view(mask, tile, plane_shape):
                    continue
                region, crop = _crop(mask, (oy, ox))
                found.append(_Candidate(region, crop.copy(), float(iou[k]), float(stab[j])))
    return found


def _nms(candidates: list[_Candidate], iou_threshold: float) -> list[_Candidate]:
    if not candidates:
        return []
    keep = box_nms([c.box for c in candidates], [c.iou for c in candidates], iou_threshold)
    return [candidates[i] for i in keep]


def _cleaned(candidates: list[_Candidate], min_area: int) -> list[_Candidate]:
    out = []
    for c in candidates:
        mask = clean_mask(c.mask, min_area)
        cropped = _crop(mask, (c.region[0], c.region[2]))
        if cropped is None or cropped[1].sum() < max(min_area, 1):
            continue
        out.append(_Candidate(cropped[0], cropped[1], c.iou, c.stability))
    return out


def _decoder(embeddings: Embeddings) -> Predictor:
    # A predictor of our own: the embeddings' decoder may be serving the viewer. Its
    # batches run eagerly, so nothing is traced.
    return Predictor(embeddings.model, embeddings.normalization, traced=False)


def iter_grid(
    embeddings: Embeddings, plane=0, config: GridConfig | None = None
) -> Generator[Progress, None, AutomaticResult]:
    """Grid mode on one plane, tile by tile.

    Parameters
    ----------
    embeddings
        The image's :class:`~napari_sam.core.embeddings.Embeddings`; tiles not yet
        embedded are embedded on the way.
    plane
        Flat plane number or (t, z) tuple.
    config
        :class:`GridConfig`; SAM's defaults when None.

    Yields
    ------
    Progress
        After each tile (``stage="tiles"``).

    Returns
    -------
    AutomaticResult
        Through ``StopIteration.value``; use :func:`run` or :func:`segment_grid`.
    """
    config = config or GridConfig()
    flat = embeddings.source.flat_index(plane)
    grid = embeddings.grid
    predictor = _decoder(embeddings)
    candidates: list[_Candidate] = []
    for n, tile in enumerate(grid, start=1):
        predictor.set_embedding(embeddings.embedding_for(flat, tile.index))
        # NMS per tile first keeps the candidate list (and memory) small.
        candidates += _nms(_tile_candidates(predictor, tile, grid.shape, config), config.nms_iou)
        yield Progress(n, len(grid), flat, tile.index, "tiles")
    candidates = _cleaned(candidates, config.min_area)
    # Across tiles: the same object found from two tiles' points is one object.
    candidates = _nms(candidates, config.nms_iou)
    return masks_to_labels(grid.shape, candidates, config.min_area)


def _embeddings_for(image, model, channel, tile, halo, normalization) -> Embeddings:
    image = np.asarray(image) if not hasattr(image, "shape") else image
    if len(image.shape) == 2:
        axes = "YX"
    elif len(image.shape) == 3 and image.shape[-1] in (3, 4):
        axes = "YXC"
    elif len(image.shape) == 3 and channel is not None:
        axes = "YXC"
    else:
        raise ValueError(
            f"expected one plane (H, W) or (H, W, C) with C = 3 or 4 or a channel, got shape {tuple(image.shape)}; "
            "for a volume build an Embeddings and use the iter_* functions"
        )
    return Embeddings(
        image, model, cache=False, axes=axes, channel=channel, tile=tile, halo=halo, normalization=normalization
    )


def segment_grid(
    image,
    model,
    config: GridConfig | None = None,
    *,
    channel: int | None = None,
    tile: int | None = None,
    halo: int | None = None,
    normalization: Normalization = Normalization(),
) -> AutomaticResult:
    """Grid mode on one 2D plane in one call (embeddings kept in memory only).

    Parameters
    ----------
    image
        (H, W) or (H, W, 3|4) plane, or (H, W, C) with ``channel``.
    model
        A loaded SAM.
    config
        :class:`GridConfig`.
    channel, tile, halo, normalization
        See :class:`~napari_sam.core.embeddings.Embeddings`.

    Returns
    -------
    AutomaticResult
    """
    return run(iter_grid(_embeddings_for(image, model, channel, tile, halo, normalization), 0, config))


def iter_grid_volume(
    embeddings: Embeddings, planes=None, config: GridConfig | None = None, link_iou: float = 0.3
) -> Generator[Progress, None, tuple[np.ndarray, list[AutomaticResult]]]:
    """Grid mode on several planes, linked into 3D objects (:func:`link_planes`).

    Parameters
    ----------
    embeddings
        The image's embeddings.
    planes
        Flat plane numbers in order (default: all planes).
    config
        :class:`GridConfig`.
    link_iou
        ``min_iou`` of :func:`link_planes`.

    Yields
    ------
    Progress
        After each tile of each plane (``stage="tiles"``), and after each plane
        (``stage="planes"``).

    Returns
    -------
    (numpy.ndarray, list of AutomaticResult)
        The (Z, H, W) uint32 label volume and each plane's result (with 2D ids).
    """
    planes = list(range(embeddings.source.n_planes)) if planes is None else list(planes)
    if not planes:
        raise ValueError("no planes to segment")
    results = []
    for i, plane in enumerate(planes, start=1):
        results.append((yield from iter_grid(embeddings, plane, config)))
        yield Progress(i, len(planes), embeddings.source.flat_index(plane), None, "planes")
    return link_planes([r.labels for r in results], link_iou), results


def segment_grid_volume(
    image, model, config: GridConfig | None = None, *, axes: str = "ZYX", link_iou: float = 0.3, **options
) -> np.ndarray:
    """Grid mode on every plane of a volume, linked into 3D; returns (Z, H, W) labels.

    ``options`` go to :class:`~napari_sam.core.embeddings.Embeddings` (``tile``,
    ``halo``, ``channel``, ``normalization``, ``cache``; in memory by default).
    """
    options.setdefault("cache", False)
    emb = Embeddings(image, model, axes=axes, **options)
    return run(iter_grid_volume(emb, None, config, link_iou))[0]


# -- detector-prompted mode -----------------------------------------------------------------
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
        # a box needs x1 > x0 and y1 > y0
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
        Objects in the order of :func:`masks_to_labels` (largest first);
        ``stability`` is NaN for objects segmented across tiles.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) as (x0, y0, x1, y1), got {boxes.shape}")
    flat = embeddings.source.flat_index(plane)
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
    predictor = _decoder(embeddings)
    threshold = float(embeddings.model.mask_threshold)
    candidates: list[_Candidate] = []
    done = 0
    for index, members in groups.items():
        tile = grid[index]
        oy, ox = tile.outer[0], tile.outer[2]
        predictor.set_embedding(embeddings.embedding_for(flat, index))
        upscale = _upscaler(predictor)
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            local = boxes[chunk] - (ox, oy, ox, oy)
            pred = predictor.predict_batch(boxes=local, multimask=False)
            for c0 in range(0, len(chunk), _UPSCALE_CHUNK):
                sub = slice(c0, c0 + _UPSCALE_CHUNK)
                logits = upscale(pred.low_res_logits[sub, 0])
                stab = stability_score(logits, 1.0, threshold)
                for j in range(logits.shape[0]):
                    cropped = _crop(logits[j] > threshold, (oy, ox))
                    if cropped is not None:
                        iou = float(pred.iou[c0 + j, 0])
                        candidates.append(_Candidate(cropped[0], cropped[1].copy(), iou, float(stab[j])))
            done += len(chunk)
            yield Progress(done, len(boxes), flat, index, "boxes")
    for i in across:
        obj = embeddings.segment(flat, box=boxes[i])
        if obj.area:
            candidates.append(_Candidate(obj.region, obj.mask, float(obj.iou)))
        done += 1
        yield Progress(done, len(boxes), flat, None, "boxes")
    return masks_to_labels(grid.shape, candidates, min_area)


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
    emb = _embeddings_for(image, model, channel, tile, halo, normalization)
    if boxes is None and labels is not None:
        boxes = boxes_from_labels(labels, min_area)[0]
    elif boxes is None:
        plane = np.asarray(image)
        if channel is not None:
            plane = plane[..., channel]
        boxes = detect_boxes(plane, method=method, min_area=min_area)
    return run(iter_from_boxes(emb, 0, boxes, batch_size=batch_size, min_area=min_area))


# -- 3D ------------------------------------------------------------------------------------
def _overlap_iou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every pair of objects of two label planes that overlap at all.

    Returns ids of ``a``, ids of ``b`` and the (len(ids_a), len(ids_b)) IoU matrix.
    """
    ids_a, area_a = np.unique(a[a > 0], return_counts=True)
    ids_b, area_b = np.unique(b[b > 0], return_counts=True)
    iou = np.zeros((len(ids_a), len(ids_b)))
    both = (a > 0) & (b > 0)
    if both.any() and len(ids_a) and len(ids_b):
        pairs, inter = np.unique(np.stack([a[both], b[both]]), axis=1, return_counts=True)
        ia = np.searchsorted(ids_a, pairs[0])
        ib = np.searchsorted(ids_b, pairs[1])
        iou[ia, ib] = inter / (area_a[ia] + area_b[ib] - inter)
    return ids_a, ids_b, iou


def link_planes(label_planes: Iterable[np.ndarray], min_iou: float = 0.3) -> np.ndarray:
    """Link the 2D instances of consecutive planes into 3D objects.

    Objects of plane z + 1 are matched one-to-one to objects of plane z by maximum total
    IoU (Hungarian assignment, :func:`scipy.optimize.linear_sum_assignment`); a matched
    object continues the 3D object of its partner, an unmatched one (or one matched with
    an IoU below ``min_iou``) starts a new 3D object. When an object splits, the piece
    overlapping it best continues it and the other starts a new object; when two merge,
    the merged object continues the one it overlaps best and the other ends.

    Parameters
    ----------
    label_planes
        Sequence of (H, W) integer label planes (or a (Z, H, W) array), each with its own
        ids, 0 = background.
    min_iou
        Smallest IoU for two objects of consecutive planes to be one object.

    Returns
    -------
    numpy.ndarray
        (Z, H, W) uint32 labels; ids 1..n numbered in order of first appearance.
    """
    planes = [np.asarray(p) for p in label_planes]
    if not planes:
        raise ValueError("no label planes to link")
    shape = planes[0].shape
    for z, p in enumerate(planes):
        if p.ndim != 2 or p.shape != shape or p.dtype.kind not in "iub":
            raise ValueError(f"plane {z}: expected an integer (H, W) = {shape} label plane, got {p.dtype} {p.shape}")
    if not 0 <= min_iou <= 1:
        raise ValueError(f"min_iou must be in [0, 1], got {min_iou}")
    out = np.zeros((len(planes), *shape), np.uint32)
    next_id = 1
    prev: np.ndarray | None = None
    prev_map: dict[int, int] = {}
    for z, plane in enumerate(planes):
        ids = np.unique(plane[plane > 0])
        mapping: dict[int, int] = {}
        if prev is not None and len(ids):
            ids_a, ids_b, iou = _overlap_iou(prev, plane)
            if iou.size:
                rows, cols = linear_sum_assignment(iou, maximize=True)
                for r, c in zip(rows, cols):
                    # min_iou 0 still needs some overlap to link
                    if iou[r, c] >= min_iou and iou[r, c] > 0:
                        mapping[int(ids_b[c])] = prev_map[int(ids_a[r])]
        for i in ids:  # in id order, so new ids are reproducible
            if int(i) not in mapping:
                mapping[int(i)] = next_id
                next_id += 1
        if len(ids):
            lut_keys = np.array(sorted(mapping), dtype=np.int64)
            lut_vals = np.array([mapping[k] for k in lut_keys], dtype=np.uint32)
            pos = np.searchsorted(lut_keys, plane[plane > 0])
            out[z][plane > 0] = lut_vals[pos]
        prev, prev_map = plane, mapping
    return out
