"""Mask geometry shared by every product: overlap, depth, deepest points, boxes, upscaling."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_sam.core.masks import (
    PlaneMask,
    bounding_box,
    deepest_pixel,
    depth,
    interior_points,
    iou,
    label_iou,
    prompt_box,
    region_iou,
    upscale_logits,
)


def _disc(shape, centre, r):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r**2


def test_iou_values_broadcasting_and_the_empty_convention():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:, :5] = True
    b[:, 2:6] = True
    assert iou(a, b) == pytest.approx(30 / 60)
    assert iou(a, a) == 1.0 and iou(a, ~a) == 0.0
    empty = np.zeros((10, 10), bool)
    assert iou(empty, empty) == 0.0 and iou(empty, empty, empty=1.0) == 1.0
    stack = np.stack([a, b, empty])
    np.testing.assert_allclose(iou(stack, a, empty=1.0), [1.0, 0.5, 0.0])


def test_region_iou_aligns_crops_of_one_plane():
    a = PlaneMask.from_full(_disc((50, 50), (20, 20), 8))
    b = PlaneMask.from_full(_disc((50, 50), (24, 22), 8))
    expected = iou(a.to_full((50, 50)), b.to_full((50, 50)))
    assert 0 < expected < 1 and region_iou(a, b) == pytest.approx(expected)
    assert region_iou(PlaneMask.empty(), PlaneMask.empty()) == 0.0


def test_label_iou_matches_pairwise_masks():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, (30, 30))
    b = rng.integers(0, 5, (30, 30)) * 3  # ids need not be consecutive
    ids_a, ids_b, m = label_iou(a, b)
    assert ids_a.tolist() == [1, 2, 3] and ids_b.tolist() == [3, 6, 9, 12]
    for i, p in enumerate(ids_a):
        for j, q in enumerate(ids_b):
            assert m[i, j] == pytest.approx(iou(a == p, b == q))


def test_depth_is_the_padded_distance_transform_on_the_crop_only():
    rng = np.random.default_rng(1)
    for _ in range(20):
        mask = ndimage.binary_opening(rng.random((40, 50)) > 0.4)
        expected = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        np.testing.assert_array_equal(depth(mask), expected)
    assert not depth(np.zeros((5, 5), bool)).any()


def test_deepest_pixel_window_ties_and_empty():
    mask = np.zeros((20, 30), bool)
    mask[5:10, 3:28] = True  # a bar: its middle row ties along its length
    d = depth(mask)
    assert deepest_pixel(d) == (7, 5)  # first in row-major order
    assert deepest_pixel(d, (slice(0, 20), slice(20, 30))) == (7, 20)
    assert deepest_pixel(d, (slice(12, 20), slice(0, 30))) is None
    picks = {deepest_pixel(d, rng=np.random.default_rng(s)) for s in range(20)}
    assert len(picks) > 1 and all(r == 7 and d[r, c] == d.max() for r, c in picks)


def test_interior_points_are_deep_far_apart_and_pixel_centres():
    mask = _disc((60, 80), (30, 20), 10) | _disc((60, 80), (30, 60), 10)
    pts = interior_points(mask, 2)
    assert pts.shape == (2, 2)
    np.testing.assert_allclose(sorted(pts[:, 0]), [20.5, 60.5])  # (x, y) of the two centres
    np.testing.assert_allclose(pts[:, 1], [30.5, 30.5])
    assert interior_points(np.zeros((5, 5), bool), 3).shape == (0, 2)


def test_boxes_inclusive_and_widened_for_thin_objects():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    np.testing.assert_array_equal(bounding_box(mask), [3, 2, 8, 4])
    line = np.zeros((10, 12), bool)
    line[4, 2:7] = True
    np.testing.assert_array_equal(prompt_box(line), [2, 4, 6, 5])
    corner = np.zeros((10, 12), bool)
    corner[9, 11] = True
    np.testing.assert_array_equal(prompt_box(corner), [10, 8, 11, 9])
    with pytest.raises(ValueError, match="empty"):
        bounding_box(np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="2D"):
        bounding_box(np.zeros(3, bool))


def test_upscale_logits_keeps_leading_axes(tiny_sam):
    low = torch.randn(2, 3, 256, 256)
    full = upscale_logits(tiny_sam, low, (768, 1024), (300, 400))
    assert full.shape == (2, 3, 300, 400)
    one = tiny_sam.postprocess_masks(low[1, 2][None, None], (768, 1024), (300, 400))[0, 0]
    assert torch.equal(full[1, 2], one)


def test_plane_mask_crop_round_trip():
    full = _disc((40, 40), (10, 30), 5)
    m = PlaneMask.from_full(full, iou=0.7)
    assert m.region == (5, 16, 25, 36) and m.area == full.sum() and m.iou == 0.7
    np.testing.assert_array_equal(m.to_full((40, 40)), full)
    padded = PlaneMask((0, 40, 0, 40), full, 0.7, ((0, 0),))
    assert padded.cropped().region == m.region and padded.cropped().tiles == ((0, 0),)


def test_iou_of_tensors_matches_numpy_and_keeps_the_device_type():
    rng = np.random.default_rng(3)
    a, b = rng.random((4, 9, 9)) > 0.5, rng.random((4, 9, 9)) > 0.6
    a[1] = b[1] = False
    got = iou(torch.from_numpy(a), torch.from_numpy(b), empty=1.0)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), iou(a, b, empty=1.0), rtol=1e-6)
