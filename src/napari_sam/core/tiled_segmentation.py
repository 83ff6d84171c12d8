"""Answering one object's prompts on a plane that was embedded tile by tile.

Each tile's embedding sees its interior plus a halo. A prompt is first answered by the
tile whose interior holds the clicked point (or whose embedded region holds most of the
box). When the mask reaches into a neighbour's interior, the object continues there, so
that neighbour is asked too: with the user's prompts that fall in its region and with a
foreground point taken from the part of the object that both tiles see and that the
first tile owns, at the pixel deepest inside the mask (the surest one). Among the
neighbour's candidate masks, the one that agrees best with what is already known on the
shared region is kept. This repeats, tile after tile, until the object stops growing or
``max_tiles`` is reached. Every tile contributes its mask inside its own interior only,
so the pieces join without overlaps, and an object spanning many tiles comes out whole.
Last, detached specks of the answer that hold no foreground click are dropped
(:func:`~napari_sam.core.masks.drop_fragments`): they are mostly slivers of a neighbour.
A correction whose single mask leaves one of its clicks clearly on the wrong side is
answered by the model's most likely mask that honours them all, where it has one
(:mod:`napari_sam.core.honoured_clicks`).

The model is behind a callable, so the same code runs with SAM and, in tests, with an
exact reference segmenter.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from .honoured_clicks import honouring_choice
from .masks import PlaneMask, deepest_pixel, depth, drop_fragments, iou
from .preprocess import preprocess_shape
from .prompts import Prompt
from .tiling import Tile, TileGrid

if TYPE_CHECKING:
    from .predictor import Prediction

__all__ = ["LazyMasks", "TileAnswer", "carry_answer", "segment_tiled"]

TileAnswer = Callable[..., tuple[np.ndarray, np.ndarray]]
"""``answer(tile, points, labels, box, multimask) -> (masks, iou)``: points (N, 2) and box
(4,) in (x, y) pixels of the tile's embedded region; masks (C, h, w) bool over that
region, or any sequence whose ``masks[k]`` gives the k-th (so that only the masks used
are upscaled); iou (C,) predicted scores. When :func:`segment_tiled` refines an earlier
answer it also passes ``mask_input=`` (the low-res logits of that answer); masks with a
``low_res_logits`` attribute ((C, h', w')) let the result be refined in turn."""


class LazyMasks:
    """A :class:`~napari_sam.core.predictor.Prediction`'s candidate masks as a
    :data:`TileAnswer` gives them: upscaled one by one when asked for."""

    def __init__(self, prediction: Prediction):
        self.prediction = prediction
        self._masks: dict[int, np.ndarray] = {}  # a mask read twice (checked, then kept) is upscaled once

    def __len__(self) -> int:
        return len(self.prediction.iou)

    def __getitem__(self, k: int) -> np.ndarray:
        if k not in self._masks:
            self._masks[k] = self.prediction.mask(k)
        return self._masks[k]

    @property
    def low_res_logits(self) -> np.ndarray:
        return self.prediction.prompt_logits


def _inside(points: np.ndarray, region: tuple[int, int, int, int]) -> np.ndarray:
    y0, y1, x0, x1 = region
    return (points[:, 0] >= x0) & (points[:, 0] < x1) & (points[:, 1] >= y0) & (points[:, 1] < y1)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    y0, y1 = max(a[0], b[0]), min(a[1], b[1])
    x0, x1 = max(a[2], b[2]), min(a[3], b[3])
    return (y0, y1, x0, x1) if y0 < y1 and x0 < x1 else None


def _local(region: tuple[int, int, int, int], tile: Tile) -> tuple[slice, slice]:
    """A plane region as slices of the tile's embedded region."""
    oy, ox = tile.outer[0], tile.outer[2]
    return slice(region[0] - oy, region[1] - oy), slice(region[2] - ox, region[3] - ox)


def _first_tile(grid: TileGrid, points: np.ndarray, labels: np.ndarray, box: np.ndarray | None) -> Tile:
    if box is not None:
        x0, y0, x1, y1 = box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2

        def score(t: Tile):
            o = _overlap(t.outer, (y0, y1, x0, x1))
            area = 0.0 if o is None else (o[1] - o[0]) * (o[3] - o[2])
            iy0, iy1, ix0, ix1 = t.inner
            return (area, -abs((iy0 + iy1) / 2 - cy) - abs((ix0 + ix1) / 2 - cx))

        return max(grid, key=score)
    fg = points[labels == 1]
    votes: dict[tuple[int, int], int] = {}
    for x, y in fg:
        idx = grid.tile_at(x, y).index
        votes[idx] = votes.get(idx, 0) + 1
    # the tile holding most foreground points; ties go to the first point's tile
    first = grid.tile_at(*fg[0]).index
    best = max(votes, key=lambda i: (votes[i], i == first))
    return grid[best]


def _deepest_point(distances: np.ndarray, window: tuple[slice, slice]) -> tuple[float, float] | None:
    """(x, y) pixel centre of the deepest mask pixel inside ``window``, or None if the
    mask does not reach into it."""
    pixel = deepest_pixel(distances, window)
    return None if pixel is None else (pixel[1] + 0.5, pixel[0] + 0.5)


def segment_tiled(
    grid: TileGrid,
    answer: TileAnswer,
    prompt: Prompt,
    multimask: bool | None = None,
    max_tiles: int = 16,
) -> PlaneMask:
    """Segment one object from its prompt in plane pixels, across as many tiles as it spans.

    Parameters
    ----------
    grid
        The plane's tiles.
    answer
        Answers prompts on one tile (see :data:`TileAnswer`).
    prompt
        Points and box in plane pixels; its ``previous`` answer, when it has logits and
        the prompt still starts on the tile that answered it, sends those logits to the
        first tile as the mask prompt (SAM's interactive loop) and a single mask is asked
        for.
    multimask
        Ask the first tile for three candidate masks and keep the best; by default only
        for an ambiguous prompt (a single point without a box).
    max_tiles
        Tiles asked at most; an object reaching further comes back with
        ``complete=False``.

    Returns
    -------
    PlaneMask

    Raises
    ------
    ValueError
        For points outside the plane or a box entirely outside it.
    """
    prompt = prompt.on_plane(grid.shape)
    pts, lbl, bx, previous = prompt.points, prompt.labels, prompt.box, prompt.previous
    first = _first_tile(grid, pts, lbl, bx)
    # The mask prompt for the first tile, when the previous answer came from it.
    refine_logits = previous.logits if previous is not None and previous.tiles[:1] == (first.index,) else None
    refine = refine_logits is not None
    if multimask is None:
        multimask = prompt.ambiguous and not refine
    first_logits = None
    masks: dict[tuple[int, int], np.ndarray] = {}  # tile index -> mask over tile.outer
    hints: dict[tuple[int, int], list[tuple[float, float]]] = {}
    order: list[tuple[int, int]] = []
    queue = deque([first.index])
    first_iou = 0.0
    complete = True
    while queue:
        index = queue.popleft()
        if index in masks:
            continue
        if len(masks) >= max_tiles:
            complete = False
            break
        tile = grid[index]
        oy0, _, ox0, _ = tile.outer
        keep = _inside(pts, tile.outer)
        t_pts = [pts[keep] - (ox0, oy0)]
        t_lbl = [lbl[keep]]
        for hx, hy in hints.get(index, []):
            t_pts.append(np.array([[hx - ox0, hy - oy0]]))
            t_lbl.append(np.array([1]))
        t_pts_a, t_lbl_a = np.concatenate(t_pts), np.concatenate(t_lbl)
        t_box = None
        if bx is not None:
            o = _overlap(tile.outer, (bx[1], bx[3], bx[0], bx[2]))
            if o is not None:
                t_box = np.array([o[2] - ox0, o[0] - oy0, o[3] - ox0, o[1] - oy0], dtype=np.float64)
        if t_box is None and not (t_lbl_a == 1).any():
            continue  # nothing to ask this tile
        is_first = index == first.index
        asked = (tile, t_pts_a if len(t_pts_a) else None, t_lbl_a if len(t_pts_a) else None, t_box,
                 multimask or not is_first)
        if is_first and refine_logits is not None:
            candidates, predicted = answer(*asked, mask_input=refine_logits)
            if not multimask and t_box is None and len(t_pts_a) > 1:
                # a box's corrections are left as SAM answers them: the rule measured
                # nothing there (docs/default_model.md, "Corrections that honour their clicks")
                candidates, predicted = _honouring(answer, asked, refine_logits, candidates, predicted)
        else:
            candidates, predicted = answer(*asked)
        predicted = np.asarray(predicted, dtype=np.float64).reshape(-1)
        if is_first:
            pick = int(np.argmax(predicted))
            first_iou = float(predicted[pick])
            logits = getattr(candidates, "low_res_logits", None)
            first_logits = None if logits is None else np.asarray(logits[pick], np.float32)
        else:
            pick = _most_consistent(candidates, predicted, tile, masks, grid)
        mask = np.asarray(candidates[pick], bool)
        masks[index] = mask
        order.append(index)
        # Where the mask runs into a neighbour's interior, the object goes on there.
        distances = None
        for other in grid.tiles_touching((tile.outer[2], tile.outer[0], tile.outer[3], tile.outer[1])):
            if other.index in masks or other.index == index:
                continue
            seen = _overlap(other.inner, tile.outer)
            if seen is None:  # tiles_touching returns only tiles whose interior overlaps
                raise RuntimeError(f"tile {other.index} does not overlap tile {index}")
            window = _local(seen, tile)
            if not mask[window].any():
                continue
            distances = depth(mask) if distances is None else distances
            # The hint comes from the part this tile owns and the neighbour also sees.
            shared = _overlap(tile.inner, other.outer)
            hint = None if shared is None else _deepest_point(distances, _local(shared, tile))
            hint = hint or _deepest_point(distances, window)
            if hint is None:  # the mask reaches into the window, so it has a deepest pixel
                raise RuntimeError(f"no mask pixel found where the mask reaches tile {other.index}")
            hints.setdefault(other.index, []).append((hint[0] + ox0, hint[1] + oy0))
            queue.append(other.index)
    whole = _assemble(grid, masks, order, first_iou, complete)
    return dataclasses.replace(_without_fragments(whole, pts, lbl), logits=first_logits)


def carry_answer(previous: PlaneMask, source: TileGrid, target: TileGrid, prompt: Prompt, image_size: int,
                 magnification: float) -> PlaneMask:
    """An answer made on one grid, re-expressed as the mask prompt for another grid of the
    same plane (the plane embedded at another magnification), so that a correction can be
    answered there and still send the earlier answer's logits (SAM's interactive loop).

    Parameters
    ----------
    previous
        The answer. Its ``logits`` (S, S) are the mask decoder's for its first tile
        ``previous.tiles[0]`` of ``source``, in that tile's model-input frame (S = image_size
        / 4; the tile's longest side resized to ``image_size``, padded below and right).
    source, target
        The plane's tiles where the answer was made and where the correction will be.
    prompt
        The correction; it decides which tile of ``target`` answers first.
    image_size
        The model's input side.
    magnification
        The magnification of ``target`` (recorded as the carried answer's frame).

    Returns
    -------
    PlaneMask
        ``previous`` with its logits resampled (bilinear) onto the first target tile's
        grid, that tile as its first and ``magnification`` as its frame. Where the target
        tile sees beyond the source tile, the logits are the source's lowest (background).
        Without logits in ``previous``, none in the result (the correction then starts
        afresh).
    """
    if previous.logits is None or not previous.tiles:
        return dataclasses.replace(previous, logits=None, tiles=(), magnification=magnification)
    shape = np.shape(previous.logits)
    logits = np.asarray(previous.logits, np.float32)
    size = int(shape[-1])
    logits = logits.reshape(size, size)
    per_cell = image_size / size  # model-input pixels per logit

    def frame(tile: Tile) -> tuple[np.ndarray, np.ndarray]:
        # (y, x) model-input pixels per plane pixel: the longest side resized to the input
        h, w = tile.shape
        ih, iw = preprocess_shape(h, w, image_size)
        return np.array([ih / h, iw / w]), np.array([ih, iw]) / per_cell

    old, new = source[previous.tiles[0]], _first_tile(target, prompt.points, prompt.labels, prompt.box)
    old_scale, old_valid = frame(old)
    new_scale, _ = frame(new)
    centres = (np.arange(size) + 0.5) * per_cell  # cell centres in model-input pixels
    # new cell centre -> plane -> old cell coordinates (cell k is centred on k + 0.5)
    ys = (new.outer[0] + centres / new_scale[0] - old.outer[0]) * old_scale[0] / per_cell - 0.5
    xs = (new.outer[2] + centres / new_scale[1] - old.outer[2]) * old_scale[1] / per_cell - 0.5
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    seen = logits[: math.ceil(old_valid[0]), : math.ceil(old_valid[1])]
    carried = ndimage.map_coordinates(logits, [gy, gx], order=1, mode="nearest")
    outside = (gy < -0.5) | (gx < -0.5) | (gy > old_valid[0] - 0.5) | (gx > old_valid[1] - 0.5)
    carried[outside] = seen.min()
    return dataclasses.replace(previous, logits=carried.reshape(shape).astype(np.float32), tiles=(new.index,),
                               magnification=magnification)


class _Chosen:
    """One candidate of a tile's answer, as an answer of that one mask."""

    def __init__(self, candidates, k: int):
        self.candidates, self.k = candidates, k

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.candidates[self.k]

    @property
    def low_res_logits(self) -> np.ndarray:
        return self.candidates.low_res_logits[self.k : self.k + 1]


def _honouring(answer: TileAnswer, asked: tuple, logits: np.ndarray, candidates, predicted: np.ndarray):
    """A correction's single mask, or the model's most likely other mask for its clicks
    that honours them all (:func:`~napari_sam.core.honoured_clicks.honouring_choice`)."""
    tile, points, labels = asked[:3]

    def ask():
        return answer(tile, points, labels, None, True, mask_input=logits)

    # one low-res mask cell in tile pixels: the tile's longest side spans the logits' side
    choice = honouring_choice(candidates[0], ask, points, labels, max(tile.shape) / logits.shape[-1])
    if choice is None:
        return candidates, predicted
    masks, k, score = choice
    return _Chosen(masks, k), np.array([score])


def _without_fragments(found: PlaneMask, points: np.ndarray, labels: np.ndarray) -> PlaneMask:
    """The object without small detached pieces (:func:`~napari_sam.core.masks.drop_fragments`),
    its region shrunk to what is left."""
    if not found.area:
        return found
    y0, _, x0, _ = found.region
    kept = drop_fragments(found.mask, points - (x0, y0) if len(points) else None, labels)
    return found if kept is found.mask else dataclasses.replace(found, mask=kept).cropped()


def _most_consistent(candidates: np.ndarray, predicted: np.ndarray, tile: Tile, masks: dict, grid: TileGrid) -> int:
    """The candidate that agrees best (IoU) with the answers of tiles already asked, on
    the regions both see; predicted IoU breaks ties."""
    scores = np.zeros(len(candidates))
    for index, known in masks.items():
        other = grid[index]
        o = _overlap(tile.outer, other.outer)
        if o is None:
            continue
        mine, theirs = _local(o, tile), known[_local(o, other)]
        for k in range(len(predicted)):
            scores[k] += iou(np.asarray(candidates[k], bool)[mine], theirs)
    return int(np.lexsort((predicted, scores))[-1])


def _assemble(grid: TileGrid, masks: dict, order: list, predicted: float, complete: bool) -> PlaneMask:
    pieces = []
    for index in order:
        tile = grid[index]
        part = masks[index][tile.inner_in_outer]
        if part.any():
            pieces.append((tile.inner, part))
    if not pieces:
        return PlaneMask.empty(predicted, tuple(order), complete)
    boxes = []
    for (y0, _, x0, _), part in pieces:
        rows, cols = np.flatnonzero(part.any(1)), np.flatnonzero(part.any(0))
        boxes.append((y0 + rows[0], y0 + rows[-1] + 1, x0 + cols[0], x0 + cols[-1] + 1))
    region = (min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes))
    out = np.zeros((region[1] - region[0], region[3] - region[2]), bool)
    for (y0, y1, x0, x1), part in pieces:
        o = _overlap((y0, y1, x0, x1), region)
        if o is None:  # region is the union of the pieces' boxes
            raise RuntimeError(f"piece {(y0, y1, x0, x1)} lies outside the assembled region {region}")
        out[o[0] - region[0] : o[1] - region[0], o[2] - region[2] : o[3] - region[2]] |= part[
            o[0] - y0 : o[1] - y0, o[2] - x0 : o[3] - x0
        ]
    ry0, ry1, rx0, rx1 = (int(v) for v in region)
    return PlaneMask((ry0, ry1, rx0, rx1), out, predicted, tuple(order), complete)
