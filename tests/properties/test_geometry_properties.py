"""Tiles and masks: tile interiors partition the plane exactly for any tile and halo;
IoU is a symmetric number in [0, 1]; a bounding box holds its mask."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_sam.core.masks import PlaneMask, bounding_box, iou, label_iou, prompt_box, region_iou
from napari_sam.core.tiling import TileGrid

sizes = st.integers(1, 300)


@given(shape=st.tuples(sizes, sizes), tile=st.integers(1, 400), halo=st.integers(0, 200))
def test_tile_interiors_partition_the_plane_and_halos_stay_inside(shape, tile, halo):
    try:
        grid = TileGrid(shape, tile=tile, halo=halo)
    except ValueError as err:
        assert halo > tile and "halo" in str(err)  # a halo wider than the tile may be refused
        return
    H, W = shape
    cover = np.zeros(shape, np.int32)
    for t in grid:
        y0, y1, x0, x1 = t.inner
        oy0, oy1, ox0, ox1 = t.outer
        assert 0 <= oy0 <= y0 < y1 <= oy1 <= H and 0 <= ox0 <= x0 < x1 <= ox1 <= W
        assert oy0 == max(0, y0 - halo) and ox1 == min(W, x1 + halo)
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()  # every pixel in exactly one interior
    for x, y in ((0, 0), (W - 1, H - 1), (W // 2, H // 2)):
        y0, y1, x0, x1 = grid.tile_at(x, y).inner
        assert y0 <= y < y1 and x0 <= x < x1


@given(shape=st.tuples(st.integers(-5, 10), st.integers(-5, 10)), tile=st.integers(-5, 10), halo=st.integers(-5, 10))
def test_invalid_tile_grids_are_refused_with_value_error(shape, tile, halo):
    if min(shape) > 0 and 0 <= halo <= tile:
        assert len(TileGrid(shape, tile=tile, halo=halo)) >= 1
    elif min(shape) > 0 and 0 < tile < halo:
        pass  # accepted or refused: the tests above cover both
    else:
        with pytest.raises(ValueError, match="tile grid|tile must|halo"):
            TileGrid(shape, tile=tile, halo=halo)


masks = hnp.arrays(bool, st.tuples(st.integers(1, 12), st.integers(1, 12)))


@given(data=st.data(), a=masks)
def test_iou_is_symmetric_in_0_1_and_one_for_itself(data, a):
    b = data.draw(hnp.arrays(bool, a.shape))
    for empty in (0.0, 1.0):
        v = iou(a, b, empty)
        assert 0.0 <= v <= 1.0 and v == iou(b, a, empty)
        assert iou(a, a, empty) == (1.0 if a.any() else empty)
    pa, pb = PlaneMask.from_full(a), PlaneMask.from_full(b)
    if a.any() and b.any():
        assert region_iou(pa, pb) == pytest.approx(iou(a, b))
    ids_a, ids_b, m = label_iou(a.astype(np.uint8), b.astype(np.uint8))
    assert m.shape == (len(ids_a), len(ids_b)) and ((0 <= m) & (m <= 1)).all()


@given(mask=masks)
def test_bounding_box_holds_the_mask_or_refuses_an_empty_one(mask):
    if not mask.any():
        with pytest.raises(ValueError, match="empty"):
            bounding_box(mask)
        return
    x0, y0, x1, y1 = bounding_box(mask).astype(int)
    inside = np.zeros_like(mask)
    inside[y0 : y1 + 1, x0 : x1 + 1] = True
    assert not (mask & ~inside).any()  # nothing outside
    assert mask[y0].any() and mask[y1].any() and mask[:, x0].any() and mask[:, x1].any()  # tight
    H, W = mask.shape
    px0, py0, px1, py1 = prompt_box(mask)
    assert px0 <= x0 and py0 <= y0 and px1 >= x1 and py1 >= y1 and px1 > px0 and py1 > py0
    # inside the plane, except along a side one pixel long, where no wider box fits
    assert (0 <= px0 and px1 <= W - 1) or W == 1
    assert (0 <= py0 and py1 <= H - 1) or H == 1
    full = PlaneMask.from_full(mask)
    assert np.array_equal(full.to_full(mask.shape), mask) and full.area == mask.sum()
