"""Grid mode: the grid of points, masks cut by a tile's view, and end to end with the
tiny SAM on one tile and over tiles."""

import numpy as np
import pytest

from napari_sam.auto import GridConfig, Progress, grid_points, iter_grid, segment_grid
from napari_sam.auto.grid import _cut_by_view
from napari_sam.core.embeddings import Embeddings
from napari_sam.core.tiling import Tile
from tests.conftest import drain


def test_grid_points_sit_at_cell_centres():
    pts = grid_points((0, 10, 100, 120), 2)
    np.testing.assert_allclose(pts, [[105, 2.5], [115, 2.5], [105, 7.5], [115, 7.5]])
    assert grid_points((0, 64, 0, 64), 32).shape == (1024, 2)
    with pytest.raises(ValueError):
        grid_points((0, 10, 0, 10), 0)


def test_a_mask_cut_by_the_tiles_view_is_recognised():
    plane = (100, 100)
    tile = Tile((0, 1), inner=(0, 40, 40, 80), outer=(0, 50, 30, 90))
    m = np.zeros((50, 60), bool)
    m[0, 10] = True  # top edge: the plane's border, nothing beyond
    assert not _cut_by_view(m, tile, plane)
    m[20, 0] = True  # left edge: the plane goes on
    assert _cut_by_view(m, tile, plane)
    m = np.zeros((50, 60), bool)
    m[49, 5] = True  # bottom edge at row 50 < 100
    assert _cut_by_view(m, tile, plane)
    m = np.zeros((50, 60), bool)
    m[10:20, 10:20] = True
    assert not _cut_by_view(m, tile, plane)


def test_grid_mode_end_to_end(tiny_sam, crop, check_result):
    image, _ = crop
    lenient = GridConfig(points_per_side=3, pred_iou_thresh=-1e9, stability_thresh=0.0, min_area=0)
    emb = Embeddings(image, tiny_sam, cache=False)
    gen = iter_grid(emb, 0, lenient)
    reports, result = drain(gen)
    assert reports == [Progress(1, 1, 0, (0, 0), "tiles")]
    check_result(result, image.shape)
    assert result.n_objects >= 1  # nothing is filtered: the 27 candidates leave something
    assert (result.stability >= 0).all() and (result.stability <= 1).all()
    strict = GridConfig(points_per_side=3, pred_iou_thresh=1e9)
    nothing = segment_grid(image, tiny_sam, strict)  # the one-call version
    assert nothing.n_objects == 0 and not nothing.labels.any()


def test_grid_mode_over_tiles(tiled, check_result):
    config = GridConfig(points_per_side=2, pred_iou_thresh=-1e9, stability_thresh=0.0, min_area=0)
    reports, result = drain(iter_grid(tiled, 0, config))
    assert [r.done for r in reports] == [1, 2] and reports[0].total == 2
    assert [r.tile for r in reports] == [(0, 0), (0, 1)]
    check_result(result, tiled.grid.shape)
