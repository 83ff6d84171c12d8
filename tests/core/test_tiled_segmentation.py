"""Objects that cross tile borders come out whole.

SAM's masks are only as good as its weights, and the tests run offline with random
ones. The merging logic is therefore checked with an exact segmenter in SAM's place: it
answers a tile with the connected piece of a real ground-truth object (DSB 2018 nuclei)
that the tile's embedded region shows, exactly as a perfect model would with that view.
Whatever the tiles, the assembled mask must equal the untiled answer: the whole object.
"""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from napari_sam.core.prompts import Prompt
from napari_sam.core.tiled_segmentation import segment_tiled
from napari_sam.core.tiling import TileGrid


class ExactSegmenter:
    """Answers a tile with what a perfect model sees: the object's visible connected piece."""

    def __init__(self, labels):
        self.labels = labels
        self.calls = []

    def __call__(self, tile, points, labels, box, multimask):
        self.calls.append(tile.index)
        view = self.labels[tile.outer_slices]
        if points is not None and (labels == 1).any():
            x, y = points[labels == 1][0]
            obj = view[int(y), int(x)]
        else:
            x0, y0, x1, y1 = np.round(box).astype(int)
            inside = view[y0:y1, x0:x1]
            ids, counts = np.unique(inside[inside > 0], return_counts=True)
            obj = ids[np.argmax(counts)] if len(ids) else 0
        if obj == 0:
            return np.zeros((1, *view.shape), bool), np.array([0.0])
        pieces, _ = ndimage.label(view == obj)
        if points is not None and (labels == 1).any():
            mask = pieces == pieces[int(y), int(x)]
        else:
            sizes = np.bincount(pieces.ravel())[1:]
            mask = pieces == 1 + int(np.argmax(sizes))
        if multimask:  # SAM's three candidates: a part, the object, and a larger blob
            return np.stack([mask & (np.arange(view.shape[1]) < x), mask, view > 0]), np.array([0.5, 0.9, 0.7])
        return mask[None], np.array([0.9])


def _crossing_objects(labels, grid):
    """Ids of single-piece objects whose pixels lie in more than one tile interior."""
    out = []
    for obj, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or ndimage.label(labels[sl] == obj)[1] != 1:
            continue
        ys, xs = np.nonzero(labels == obj)
        owners = {grid.tile_at(x, y).index for y, x in zip(ys[::7], xs[::7])}
        if len(owners) > 1:
            out.append(obj)
    return out


def _deepest(mask):
    d = ndimage.distance_transform_edt(mask)
    y, x = np.unravel_index(np.argmax(d), d.shape)
    return float(x), float(y)


@pytest.mark.parametrize("tile, halo", [(160, 32), (100, 16)])
def test_objects_crossing_tile_borders_come_out_whole(nuclei_2d, tile, halo):
    labels = nuclei_2d[1].astype(np.int64)
    grid = TileGrid(labels.shape, tile=tile, halo=halo)
    assert len(grid) > 4
    crossing = _crossing_objects(labels, grid)
    assert len(crossing) >= 15  # the test really exercises borders
    segmenter = ExactSegmenter(labels)
    for obj in crossing:
        truth = labels == obj
        by_point = segment_tiled(grid, segmenter, Prompt.make(points=[_deepest(truth)]))
        assert by_point.complete and len(by_point.tiles) >= 2
        assert np.array_equal(by_point.to_full(labels.shape), truth), f"object {obj} by point"
        ys, xs = np.nonzero(truth)
        by_box = segment_tiled(grid, segmenter, Prompt.make(box=[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]))
        assert np.array_equal(by_box.to_full(labels.shape), truth), f"object {obj} by box"


def test_a_point_near_a_border_gives_the_untiled_mask(nuclei_2d):
    labels = nuclei_2d[1].astype(np.int64)
    tiled = TileGrid(labels.shape, tile=128, halo=24)
    untiled = TileGrid(labels.shape, tile=512, halo=0)
    assert len(untiled) == 1
    segmenter = ExactSegmenter(labels)
    checked = 0
    for obj in _crossing_objects(labels, tiled):
        truth = labels == obj
        ys, xs = np.nonzero(truth)
        # the object pixel closest to a vertical interior border
        edges = np.array([t.inner[2] for t in tiled if t.inner[2] > 0])
        k = np.argmin(np.abs(xs[:, None] - edges[None]).min(1))
        point = [[xs[k] + 0.5, ys[k] + 0.5]]
        a = segment_tiled(tiled, segmenter, Prompt.make(points=point)).to_full(labels.shape)
        b = segment_tiled(untiled, segmenter, Prompt.make(points=point)).to_full(labels.shape)
        assert np.array_equal(a, b)
        checked += 1
    assert checked >= 10


def test_objects_larger_than_a_tile_and_the_tile_budget():
    labels = np.zeros((400, 500), np.int64)
    labels[50:350, 40:460] = 1  # spans every tile
    labels[180:220, 200:300] = 0  # with a hole
    grid = TileGrid(labels.shape, tile=100, halo=20)
    whole = segment_tiled(grid, ExactSegmenter(labels), Prompt.make(points=[[45, 55]]), max_tiles=len(grid))
    assert whole.complete and np.array_equal(whole.to_full(labels.shape), labels == 1)
    assert whole.region == (50, 350, 40, 460) and whole.mask.shape == (300, 420)
    part = segment_tiled(grid, ExactSegmenter(labels), Prompt.make(points=[[45, 55]]), max_tiles=3)
    assert not part.complete and len(part.tiles) == 3
    assert part.to_full(labels.shape).sum() < whole.area and not (part.to_full(labels.shape) & (labels == 0)).any()


def test_background_clicks_and_bad_prompts():
    labels = np.zeros((300, 300), np.int64)
    grid = TileGrid(labels.shape, tile=100, halo=10)
    empty = segment_tiled(grid, ExactSegmenter(labels), Prompt.make(points=[[150, 150]]))
    assert empty.area == 0 and empty.mask.shape == (0, 0) and empty.region == (0, 0, 0, 0)
    with pytest.raises(ValueError, match="outside"):
        segment_tiled(grid, ExactSegmenter(labels), Prompt.make(points=[[350, 10]]))
    with pytest.raises(ValueError, match="box or at least one foreground point"):
        segment_tiled(grid, ExactSegmenter(labels), Prompt.make(points=[[10, 10]], labels=[0]))
    with pytest.raises(ValueError, match="entirely outside"):
        segment_tiled(grid, ExactSegmenter(labels), Prompt.make(box=[400, 400, 500, 500]))


class _Candidates(list):
    """Masks with the low-res logits a real tile answer carries."""

    def __init__(self, masks, logits):
        super().__init__(masks)
        self.low_res_logits = logits


def test_refining_sends_the_first_tiles_logits_as_mask_prompt_and_asks_one_mask():
    grid = TileGrid((600, 600), tile=200, halo=25)
    seen = []

    def answer(tile, points, labels, box, multimask, mask_input=None):
        seen.append((tile.index, multimask, None if mask_input is None else float(mask_input.mean())))
        mask = np.zeros((250, 250), bool)
        # well inside the first tile (no neighbour is asked), around the clicks at (145, 145)
        # and clear of the negative one at (155, 155): nothing is asked again
        mask[140:150, 140:150] = True
        n = 3 if multimask else 1
        logits = np.stack([np.full((64, 64), float(len(points) + k)) for k in range(n)])
        return _Candidates([mask] * n, logits), np.linspace(0.5, 0.9, n)

    first = segment_tiled(grid, answer, Prompt.make(points=[[320, 320]]))
    assert seen == [((1, 1), True, None)]
    assert first.tiles == ((1, 1),) and first.logits.shape == (64, 64)
    assert first.logits.mean() == 1 + 2  # the best of three (highest IoU: the last)
    second = segment_tiled(grid, answer, Prompt.make(points=[[320, 320], [330, 330]], labels=[1, 0], previous=first))
    assert seen[-1] == ((1, 1), False, 3.0)  # the first answer's logits, one mask asked
    assert second.logits.mean() == 2.0
    # prompts that now start on another tile cannot use those logits
    segment_tiled(grid, answer, Prompt.make(points=[[50, 50], [320, 320]], previous=second))
    assert seen[-1] == ((0, 0), False, None)
    # an answer without logits (the exact segmenter, the baseline) is simply not refined
    plain = segment_tiled(grid, ExactSegmenter(np.zeros((600, 600), np.int32) + 1), Prompt.make(points=[[320, 320]]))
    assert plain.logits is None
    segment_tiled(grid, answer, Prompt.make(points=[[320, 320]], previous=plain))
    assert seen[-1] == ((1, 1), True, None)


# -- an answer carried to the same plane embedded at another magnification --
def _plane_centres(tile, size, image_size):
    """Plane (y, x) of the centre of each of a tile's (size, size) logit cells."""
    from napari_sam.core.preprocess import preprocess_shape

    h, w = tile.shape
    ih, iw = preprocess_shape(h, w, image_size)
    c = (np.arange(size) + 0.5) * image_size / size
    return tile.outer[0] + c * h / ih, tile.outer[2] + c * w / iw


@pytest.mark.parametrize("target_side", [103, 62, 300])  # 2x, about 3x, and one tile for the plane
def test_carried_logits_stay_on_their_object(target_side):
    from napari_sam.core.masks import PlaneMask
    from napari_sam.core.tiled_segmentation import carry_answer

    source = TileGrid((300, 300), tile=205, halo=26)
    target = TileGrid((300, 300), tile=target_side, halo=target_side // 8)
    first = source.tile_at(150.0, 150.0)
    ys, xs = _plane_centres(first, 64, 256)
    inside = (ys[:, None] - 150) ** 2 + (xs[None, :] - 158) ** 2 < 12**2  # a disc of radius 12 at (150, 158)
    logits = np.where(inside, 8.0, -8.0).astype(np.float32)
    logits[[0, -1], :] = logits[:, [0, -1]] = 0.5  # the tile's border cells: not to be drawn out beyond it
    answer = PlaneMask((138, 162, 146, 170), np.ones((24, 24), bool), 0.9, (first.index,), logits=logits,
                       magnification=1.0)
    click = Prompt.make(points=[(158.0, 150.0), (170.0, 170.0)], labels=[1, 0])

    carried = carry_answer(answer, source, target, click, 256, 2.0)
    new = target[carried.tiles[0]]
    assert new.index == target.tile_at(158.0, 150.0).index and carried.magnification == 2.0
    assert carried.logits.shape == (64, 64) and carried.logits.dtype == np.float32
    ty, tx = _plane_centres(new, 64, 256)
    yy, xx = np.meshgrid(ty, tx, indexing="ij")
    seen = carried.logits > 1
    cell = (ty[1] - ty[0]) * (tx[1] - tx[0])  # plane pixels per cell
    assert abs(yy[seen].mean() - 150) < 1.5 and abs(xx[seen].mean() - 158) < 1.5
    assert seen.sum() * cell == pytest.approx(np.pi * 12**2, rel=0.15)
    # beyond what the answering tile saw: its lowest logit, not its edge drawn out
    y0, y1, x0, x1 = first.outer
    beyond = (yy < y0 - 2) | (yy > y1 + 2) | (xx < x0 - 2) | (xx > x1 + 2)
    assert beyond.any()
    assert (carried.logits[beyond] == -8.0).all()

    same = carry_answer(answer, source, source, click, 256, 1.0)
    np.testing.assert_array_equal(same.logits, logits)
    bare = carry_answer(dataclasses.replace(answer, logits=None), source, target, click, 256, 2.0)
    assert bare.logits is None and bare.tiles == () and bare.magnification == 2.0
