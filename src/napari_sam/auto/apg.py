"""Automatic prompt generation (micro-sam's "APG"): objects found in the instance
decoder's maps become point prompts for SAM, and SAM's masks, filtered, are the objects.

It runs the way micro-sam 1.8.14's ``AutomaticPromptGenerator.generate`` does:

1. **Prompts** (:func:`prompt_points`). On the decoder's raw maps (not smoothed, unlike
   AIS) the seed pixels are those where ``foreground >= foreground_threshold``, ``centre
   distance < center_distance_threshold`` and ``boundary distance <
   boundary_distance_threshold``; each 4-connected component of seeds gives one
   foreground point, at its pixel farthest from the component's outside (Euclidean
   distance to the nearest pixel that is not in the component, the plane's border
   counting as outside, so that no point sits on it).
2. **Masks**. Each point goes through SAM alone, with one mask (``multimask=False``) or
   the best of three by predicted IoU; the mask is the full-resolution logits above the
   model's threshold, scored by its predicted IoU and its stability (offset 1).
3. **Filters** (:func:`select_masks`). Masks of at most ``min_size`` pixels are dropped;
   the rest are ranked by predicted IoU times stability, and a greedy non-maximum
   suppression on the *masks* drops every mask whose IoU (or intersection over the
   smaller mask, ``intersection_over_min``) with a better one is above ``nms_threshold``.
4. **Labels**. The survivors are painted from the largest to the smallest, each only
   onto pixels no earlier mask took; every 4-connected piece of one mask becomes an
   object of its own, objects under ``min_size`` pixels are removed and the rest are
   numbered 1..n in row-major order of their first pixel.

With ``refine_with_boxes``, each mask of step 2 is asked again with its box (widened by
1 % of its size on every side) and those answers go on to step 3, as micro-sam's
``refine_with_box_prompts``.

Tiling. The maps are decoded tile by tile and stitched (:mod:`~napari_sam.auto.instance_maps`),
so the prompts are found on the whole plane; each point is decoded on the tile whose
interior holds it (:func:`~napari_sam.auto.boxes.iter_from_boxes` shares that code),
and the filters run once on all masks in plane coordinates. Where micro-sam's tiled APG
keeps a mask cut by the edge of its tile's embedded region, here a mask that touches
that edge where the plane goes on is asked again across tiles
(:meth:`Embeddings.segment <napari_sam.core.embeddings.Embeddings.segment>`), so an
object crossing a tile border is one whole object; such masks have no stability score
and are ranked by their predicted IoU alone. On a plane of one tile nothing differs.

Coordinates: points are (x, y) = (column, row) pixels; maps and labels (row, col).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label
from skimage.segmentation import find_boundaries

from ..core.prompts import Prompt
from .ais import checked_map
from .boxes import iter_box_candidates, iter_tile_prompts
from .candidates import Candidate
from .instance_maps import iter_instance_maps
from .results import Progress, run

__all__ = ["APGSettings", "iter_apg", "prompt_points", "segment_apg", "select_masks"]


@dataclass(frozen=True)
class APGSettings:
    """Settings of APG (module docstring).

    The defaults are those of micro-sam 1.8.14's ``AutomaticPromptGenerator.generate``
    (its ``mask_threshold`` is the model's, as here).

    Attributes
    ----------
    center_distance_threshold
        Seeds are where the centre distance is below this (0.5) ...
    boundary_distance_threshold
        ... the boundary distance below this (0.5) ...
    foreground_threshold
        ... and the foreground probability at least this (0.5).
    min_size
        Masks of at most this many pixels are dropped before the suppression, objects of
        fewer pixels after painting (25).
    nms_threshold
        A mask overlapping a better one by more than this is a duplicate (0.9).
    intersection_over_min
        Overlap is intersection over the smaller mask's area instead of IoU (False).
    multimask
        SAM answers each point with three masks and the one of highest predicted IoU is
        kept (False: one mask).
    refine_with_boxes
        Each mask is asked again with its box (False).
    batch_size
        Prompts decoded at once (32).
    """

    center_distance_threshold: float = 0.5
    boundary_distance_threshold: float = 0.5
    foreground_threshold: float = 0.5
    min_size: int = 25
    nms_threshold: float = 0.9
    intersection_over_min: bool = False
    multimask: bool = False
    refine_with_boxes: bool = False
    batch_size: int = 32

    def __post_init__(self):
        for name in ("center_distance_threshold", "boundary_distance_threshold", "foreground_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"APG setting {name} must be a finite number, not {value!r}")
        value = self.nms_threshold
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"APG setting nms_threshold must be a number in [0, 1], not {value!r}")
        for name in ("min_size", "batch_size"):
            value, least = getattr(self, name), int(name == "batch_size")
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(f"APG setting {name} must be an integer >= {least}, not {value!r}")
        for name in ("intersection_over_min", "multimask", "refine_with_boxes"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"APG setting {name} must be True or False, not {getattr(self, name)!r}")


def prompt_points(
    foreground, center_distances, boundary_distances, settings: APGSettings | None = None
) -> np.ndarray:
    """One foreground point per object found in the instance decoder's maps (step 1 of
    the module docstring).

    Parameters
    ----------
    foreground, center_distances, boundary_distances
        (H, W) maps of the instance decoder (channels 0, 1, 2), unsmoothed.
    settings
        :class:`APGSettings` (its three thresholds); micro-sam's defaults when None.

    Returns
    -------
    numpy.ndarray
        (N, 2) float64 (x, y) pixel coordinates, one per seed component, in the order of
        the components' first pixels (row-major); (0, 2) when there is none.
    """
    settings = settings or APGSettings()
    fg = checked_map("foreground", foreground)
    center = checked_map("center_distances", center_distances, fg.shape)
    boundary = checked_map("boundary_distances", boundary_distances, fg.shape)
    seeds = (
        (fg >= settings.foreground_threshold)
        & (center < settings.center_distance_threshold)
        & (boundary < settings.boundary_distance_threshold)
    )
    components = label(seeds, connectivity=1)
    if not components.any():
        return np.zeros((0, 2))
    outside = find_boundaries(components, mode="outer")
    outside[[0, -1], :] = True
    outside[:, [0, -1]] = True
    depth = ndi.distance_transform_edt(~outside)
    points = []
    for i, box in enumerate(ndi.find_objects(components), start=1):
        inside = np.where(components[box] == i, depth[box], 0)
        row, col = np.unravel_index(np.argmax(inside), inside.shape)
        points.append((col + box[1].start, row + box[0].start))
    return np.asarray(points, dtype=np.float64)


def _overlap(a: Candidate, b: Candidate, over_min: bool) -> float:
    """Mask IoU (or intersection over the smaller area) of two candidates whose regions
    intersect."""
    ay0, ay1, ax0, ax1 = a.region
    by0, by1, bx0, bx1 = b.region
    y0, y1, x0, x1 = max(ay0, by0), min(ay1, by1), max(ax0, bx0), min(ax1, bx1)
    inter = int(np.count_nonzero(a.mask[y0 - ay0 : y1 - ay0, x0 - ax0 : x1 - ax0]
                                 & b.mask[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]))
    denominator = min(a.area, b.area) if over_min else a.area + b.area - inter
    return inter / denominator if denominator else 0.0


def _mask_nms(pool: Sequence[Candidate], scores: np.ndarray, threshold: float, over_min: bool) -> list[int]:
    """Greedy non-maximum suppression on masks: indices kept, best first (equal scores
    keep the earlier)."""
    regions = np.array([c.region for c in pool], dtype=np.int64).reshape(-1, 4)
    alive = np.ones(len(pool), bool)
    kept = []
    for i in np.argsort(-scores, kind="stable"):
        if not alive[i]:
            continue
        kept.append(int(i))
        alive[i] = False
        y0, y1, x0, x1 = regions[i]
        # only masks whose regions meet can overlap: the rest are skipped at once
        near = np.flatnonzero(
            alive & (regions[:, 0] < y1) & (regions[:, 1] > y0) & (regions[:, 2] < x1) & (regions[:, 3] > x0)
        )
        for j in near:
            if _overlap(pool[i], pool[j], over_min) > threshold:
                alive[j] = False
    return kept


def select_masks(
    shape: tuple[int, int], candidates: Sequence[Candidate], settings: APGSettings | None = None
) -> np.ndarray:
    """SAM's masks of the prompts filtered and painted into labels (steps 3 and 4 of the
    module docstring).

    Parameters
    ----------
    shape
        (H, W) of the plane.
    candidates
        The masks as crops of the plane (:class:`~napari_sam.auto.candidates.Candidate`:
        region, mask, predicted IoU, stability; NaN stability ranks by IoU alone), in
        prompt order (equal scores keep the earlier).
    settings
        :class:`APGSettings` (``min_size``, ``nms_threshold``, ``intersection_over_min``).

    Returns
    -------
    numpy.ndarray
        (H, W) uint32 labels, ids 1..n in row-major order of their first pixels.
    """
    settings = settings or APGSettings()
    pool = [c for c in candidates if c.area > settings.min_size]
    scores = np.array([c.iou * (1.0 if math.isnan(c.stability) else c.stability) for c in pool])
    kept = [pool[i] for i in _mask_nms(pool, scores, settings.nms_threshold, settings.intersection_over_min)]
    labels = np.zeros(shape, np.uint32)
    # larger first, each only where nothing is yet: a small mask on a large one keeps
    # only what the large one left (as micro-sam paints)
    for k, c in enumerate(sorted(kept, key=lambda c: -c.area), start=1):
        y0, y1, x0, x1 = c.region
        view = labels[y0:y1, x0:x1]
        view[c.mask & (view == 0)] = k
    pieces = label(labels, connectivity=1, background=0)
    sizes = np.bincount(pieces.ravel())
    keep = sizes >= settings.min_size
    keep[0] = False
    lut = np.zeros(len(sizes), np.uint32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return lut[pieces]


def _cut_by_view(c: Candidate, outer: tuple[int, int, int, int], shape: tuple[int, int]) -> bool:
    """Whether a candidate reaches an edge of the embedded region ``outer`` beyond which
    the plane goes on."""
    y0, y1, x0, x1 = c.region
    oy0, oy1, ox0, ox1 = outer
    return (y0 == oy0 > 0) or (y1 == oy1 < shape[0]) or (x0 == ox0 > 0) or (x1 == ox1 < shape[1])


def _refinement_boxes(candidates: Sequence[Candidate], shape: tuple[int, int]) -> np.ndarray:
    """Each candidate's box (first to last pixel) widened by 1 % of its size per side."""
    boxes = []
    for c in candidates:
        y0, y1, x0, x1 = c.region
        w, h = x1 - 1 - x0, y1 - 1 - y0
        boxes.append((max(x0 - 0.01 * w, 0), max(y0 - 0.01 * h, 0),
                      min(x0 + 1.01 * w, shape[1] - 1), min(y0 + 1.01 * h, shape[0] - 1)))
    # SAM needs x1 > x0 and y1 > y0: a one-pixel-thin mask gets a one-pixel-wide box
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    for lo, hi, size in ((0, 2, shape[1]), (1, 3, shape[0])):
        thin = out[:, hi] <= out[:, lo]
        out[thin, hi] = np.minimum(out[thin, lo] + 1, size - 1)
        out[thin, lo] = out[thin, hi] - 1
    return out


def iter_apg(
    embeddings, plane, decoder, settings: APGSettings | None = None, batch_size: int | None = None
) -> Generator[Progress, None, np.ndarray]:
    """APG on one plane (module docstring).

    Parameters
    ----------
    embeddings
        The image's :class:`~napari_sam.core.embeddings.Embeddings`; tiles not yet
        embedded are embedded on the way.
    plane
        Flat plane number or (t, z) tuple.
    decoder
        The model's :class:`~napari_sam.model.instance_decoder.InstanceDecoder`, in eval mode.
    settings
        :class:`APGSettings`; micro-sam's defaults when None.
    batch_size
        Tiles decoded at once by the instance decoder (prompts at once is
        ``settings.batch_size``).

    Yields
    ------
    Progress
        After each tile's maps (``stage="tiles"``), after each batch of prompts and each
        prompt asked across tiles (``stage="prompts"``, ``done``/``total`` count
        prompts); closing the generator cancels the rest.

    Returns
    -------
    numpy.ndarray
        Through ``StopIteration.value``: (H, W) uint32 labels, as :func:`select_masks`.
    """
    settings = settings or APGSettings()
    maps = yield from iter_instance_maps(embeddings, plane, decoder, batch_size)
    points = prompt_points(maps[0], maps[1], maps[2], settings)
    flat = embeddings.source.flat_index(plane)
    grid = embeddings.grid
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (x, y) in enumerate(points):
        groups.setdefault(grid.tile_at(x, y).index, []).append(i)
    found = yield from iter_tile_prompts(
        embeddings, flat, groups, settings.batch_size, len(points), points=points,
        multimask=settings.multimask, stage="prompts",
    )
    cut = [i for i, c in found if _cut_by_view(c, grid.tile_at(*points[i]).outer, grid.shape)]
    again = set(cut)
    candidates = [c for i, c in found if i not in again]
    for n, i in enumerate(cut, start=1):
        obj = embeddings.segment(flat, Prompt.make(points=points[i]), multimask=settings.multimask)
        if obj.area:
            candidates.append(Candidate(obj.region, obj.mask, float(obj.iou)))
        yield Progress(n, len(cut), flat, None, "prompts")
    if settings.refine_with_boxes and candidates:
        boxes = _refinement_boxes(candidates, grid.shape)
        candidates = yield from iter_box_candidates(embeddings, flat, boxes, settings.batch_size, "prompts")
    return select_masks(grid.shape, candidates, settings)


def segment_apg(
    embeddings,
    plane,
    decoder,
    settings: APGSettings | None = None,
    progress: Callable[[Progress], object] | None = None,
    *,
    batch_size: int | None = None,
) -> np.ndarray:
    """:func:`iter_apg` in one call; ``progress`` (if given) is called with each
    :class:`~napari_sam.auto.results.Progress`. Returns (H, W) uint32 labels."""
    return run(iter_apg(embeddings, plane, decoder, settings, batch_size), progress)
