"""Grid mode, SAM's "segment everything": a regular grid of single-point prompts goes
through the decoder in batches, each point giving three candidate masks; candidates are
kept when their predicted IoU and their stability score are high, duplicates are removed
by box non-maximum suppression, small holes and islands are cleaned, and the survivors
are painted into a label image (:mod:`~napari_sam.auto.candidates`).

Large planes are answered tile by tile through
:class:`~napari_sam.core.embeddings.Embeddings`. Every tile places its grid of points in
its *interior* only (the interiors partition the plane, so every pixel is covered by
exactly one tile's grid) and answers them on its embedded region (interior plus halo),
so an object near an interior border is still seen whole. **A candidate mask that
touches the edge of the embedded region where the plane continues is dropped**: it is
an object cut by the tile's field of view. Such an object is also prompted by the
neighbouring tile, which sees it whole as long as it reaches no further than the halo
into the first tile's interior; the duplicates that two tiles produce for an object near
their border are removed by the same non-maximum suppression that removes duplicates
within a tile (it runs on all tiles' candidates in plane coordinates). Objects wider
than a halo and crossing a border may therefore be lost in grid mode; the
detector-prompted mode (:mod:`~napari_sam.auto.boxes`) segments them across tiles.

Coordinates: prompts are (x, y) = (column, row) pixels; regions (y0, y1, x0, x1).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import numpy as np

from ..core.embeddings import Embeddings
from ..core.predictor import Predictor
from ..core.preprocess import Normalization
from ..core.tiling import Tile
from .candidates import Candidate, cleaned_candidates, masks_to_labels, nms_candidates, stability_score
from .decoding import UPSCALE_CHUNK, decoder, full_logits, plane_embeddings
from .link import link_planes
from .results import AutomaticResult, Progress, run

__all__ = ["GridConfig", "grid_points", "iter_grid", "iter_grid_volume", "segment_grid", "segment_grid_volume"]


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
        Logit offset of the stability score (see
        :func:`~napari_sam.auto.candidates.stability_score`).
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


def _tile_candidates(predictor: Predictor, tile: Tile, plane_shape, config: GridConfig) -> list[Candidate]:
    """The candidates of one tile's grid of points that pass the filters, in plane
    coordinates; ``predictor`` holds the tile's embedding."""
    points = grid_points(tile.inner, config.points_per_side)
    oy, ox = tile.outer[0], tile.outer[2]
    local = points - (ox, oy)
    threshold = float(predictor.model.mask_threshold)
    found: list[Candidate] = []
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
        for c0 in range(0, len(idx), UPSCALE_CHUNK):
            chunk = idx[c0 : c0 + UPSCALE_CHUNK]
            logits = full_logits(predictor, low[chunk])
            stab = stability_score(logits, config.stability_offset, threshold)
            for j, k in enumerate(chunk):
                if stab[j] < config.stability_thresh:
                    continue
                mask = logits[j] > threshold
                if _cut_by_view(mask, tile, plane_shape):
                    continue
                candidate = Candidate.of(mask, (oy, ox), float(iou[k]), float(stab[j]))
                if candidate is not None:
                    found.append(candidate)
    return found


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
        Through ``StopIteration.value``; use :func:`~napari_sam.auto.results.run` or
        :func:`segment_grid`.
    """
    config = config or GridConfig()
    flat = embeddings.source.flat_index(plane)
    grid = embeddings.grid
    predictor = decoder(embeddings)
    candidates: list[Candidate] = []
    for n, tile in enumerate(grid, start=1):
        predictor.set_embedding(embeddings.embedding_for(flat, tile.index))
        # NMS per tile first keeps the candidate list (and memory) small.
        candidates += nms_candidates(_tile_candidates(predictor, tile, grid.shape, config), config.nms_iou)
        yield Progress(n, len(grid), flat, tile.index, "tiles")
    candidates = cleaned_candidates(candidates, config.min_area)
    # Across tiles: the same object found from two tiles' points is one object.
    candidates = nms_candidates(candidates, config.nms_iou)
    return masks_to_labels(grid.shape, candidates, config.min_area)


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
    return run(iter_grid(plane_embeddings(image, model, channel, tile, halo, normalization), 0, config))


def iter_grid_volume(
    embeddings: Embeddings, planes=None, config: GridConfig | None = None, link_iou: float = 0.3
) -> Generator[Progress, None, tuple[np.ndarray, list[AutomaticResult]]]:
    """Grid mode on several planes, linked into 3D objects
    (:func:`~napari_sam.auto.link.link_planes`).

    Parameters
    ----------
    embeddings
        The image's embeddings.
    planes
        Flat plane numbers in order (default: all planes).
    config
        :class:`GridConfig`.
    link_iou
        ``min_iou`` of :func:`~napari_sam.auto.link.link_planes`.

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
