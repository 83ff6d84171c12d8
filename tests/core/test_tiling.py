import numpy as np
import pytest

from napari_sam.core.tiling import TileGrid


@pytest.mark.parametrize("shape, tile, halo", [((5000, 3000), 1024, 128), ((1000, 1000), 1024, 64),
                                               ((2100, 1500), 512, 0), ((7, 9000), 1024, 100)])
def test_interiors_partition_the_plane_and_outers_add_the_halo(shape, tile, halo):
    grid = TileGrid(shape, tile, halo)
    owner = np.zeros(shape, np.int32)
    for t in grid:
        y0, y1, x0, x1 = t.inner
        owner[y0:y1, x0:x1] += 1
        oy0, oy1, ox0, ox1 = t.outer
        assert oy0 == max(0, y0 - halo) and oy1 == min(shape[0], y1 + halo)
        assert ox0 == max(0, x0 - halo) and ox1 == min(shape[1], x1 + halo)
        assert y1 - y0 <= max(tile, tile + 2 * halo) and x1 - x0 <= max(tile, tile + 2 * halo)
        inner_local = t.inner_in_outer
        assert inner_local[0].stop - inner_local[0].start == y1 - y0
    assert (owner == 1).all()
    assert len(grid) == grid.grid_shape[0] * grid.grid_shape[1] == len(list(grid))


def test_small_planes_are_one_tile():
    grid = TileGrid((1200, 1100), tile=1024, halo=128)
    assert grid.grid_shape == (1, 1)
    assert grid[0, 0].outer == (0, 1200, 0, 1100)


def test_tile_at_and_local_coordinates():
    grid = TileGrid((5000, 3000), tile=1024, halo=128)
    for x, y in [(0, 0), (2999, 4999), (1023.5, 1000), (1500, 2600)]:
        t = grid.tile_at(x, y)
        y0, y1, x0, x1 = t.inner
        assert y0 <= y < y1 and x0 <= x < x1
        lx, ly = t.to_local(x, y)
        assert 0 <= lx < t.shape[1] and 0 <= ly < t.shape[0]
    with pytest.raises(ValueError, match="outside"):
        grid.tile_at(3000, 10)
    with pytest.raises(IndexError):
        grid[9, 0]


def test_tiles_touching_a_box():
    grid = TileGrid((4096, 4096), tile=1024, halo=0)
    assert [t.index for t in grid.tiles_touching((1000, 10, 1100, 20))] == [(0, 0), (0, 1)]
    assert len(grid.tiles_touching((0, 0, 4096, 4096))) == 16


@pytest.mark.parametrize("bad", [dict(shape=(0, 5)), dict(shape=(5,)), dict(shape=(5, 5), tile=0),
                                 dict(shape=(5, 5), halo=-1)])
def test_bad_grids(bad):
    with pytest.raises(ValueError):
        TileGrid(**bad)
