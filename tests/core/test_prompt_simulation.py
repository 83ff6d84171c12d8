"""Prompts simulated from ground truth: where they land and what they say."""

import numpy as np
import pytest

from napari_sam.core.prompt_simulation import (
    BACKGROUND,
    FOREGROUND,
    bounding_box,
    central_point,
    corrective_point,
    error_regions,
    interior_point,
    random_point,
)


def rectangle(shape=(20, 30), rows=(4, 11), cols=(6, 21)):
    m = np.zeros(shape, bool)
    m[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return m


def inside(mask, point):
    x, y = point
    assert float(x).is_integer() and float(y).is_integer()
    return bool(mask[int(y), int(x)])


def test_random_point_lies_inside_the_object_and_is_seeded():
    mask = np.zeros((40, 50), bool)
    mask[5:9, 30:48] = True  # wide, off-centre: a (row, col) swap would land outside
    points = [random_point(mask, np.random.default_rng(s)) for s in range(200)]
    assert all(inside(mask, p) for p in points)
    assert len({tuple(p) for p in points}) > 20
    again = [random_point(mask, np.random.default_rng(3)) for _ in range(2)]
    np.testing.assert_array_equal(again[0], again[1])


def test_interior_point_is_the_centre():
    yy, xx = np.mgrid[:41, :61]
    disk = (yy - 25) ** 2 + (xx - 17) ** 2 <= 9**2
    np.testing.assert_array_equal(interior_point(disk), [17, 25])


def test_central_point_stays_in_the_inner_half_and_spreads_over_it():
    yy, xx = np.mgrid[:41, :61]
    disk = (yy - 25) ** 2 + (xx - 17) ** 2 <= 12**2
    rng = np.random.default_rng(0)
    points = np.array([central_point(disk, rng) for _ in range(300)])
    radii = np.hypot(points[:, 0] - 17, points[:, 1] - 25)
    # depth >= half the deepest (about 12.5) means within about 6.5 pixels of the centre
    assert radii.max() <= 7.0 and radii.max() >= 5.0
    assert len({tuple(p) for p in points}) > 60
    np.testing.assert_array_equal(central_point(disk, rng, depth_fraction=1.0), [17, 25])
    everywhere = np.array([central_point(disk, rng, depth_fraction=0.0) for _ in range(300)])
    assert np.hypot(everywhere[:, 0] - 17, everywhere[:, 1] - 25).max() > 9
    assert all(inside(disk, p) for p in everywhere)
    with pytest.raises(ValueError, match="depth_fraction"):
        central_point(disk, rng, depth_fraction=1.5)
    with pytest.raises(ValueError, match="empty"):
        central_point(np.zeros((5, 5), bool), rng)


def test_bounding_box_is_x0_y0_x1_y1_inclusive():
    np.testing.assert_array_equal(bounding_box(rectangle()), [6, 4, 21, 11])


def test_noisy_box_stays_near_ordered_and_inside():
    mask = rectangle((20, 30), rows=(0, 5), cols=(20, 29))  # touches the top and right border
    exact = bounding_box(mask)
    boxes = np.stack([bounding_box(mask, np.random.default_rng(s), noise=0.5, max_noise=3) for s in range(100)])
    assert np.abs(boxes - exact).max() <= 3
    assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
    assert boxes.min() >= 0 and (boxes[:, [0, 2]] <= 29).all() and (boxes[:, [1, 3]] <= 19).all()
    assert np.abs(boxes - exact).max() > 0
    with pytest.raises(ValueError, match="rng"):
        bounding_box(mask, noise=0.1)


@pytest.mark.parametrize("placement", ["center", "random"])
def test_missed_object_part_gives_foreground_point_inside_it(placement):
    target = rectangle()
    prediction = target.copy()
    prediction[:, 15:] = False  # the right part of the object is missed
    fn, fp = error_regions(target, prediction)
    assert fn.sum() > 0 and fp.sum() == 0
    for seed in range(30):
        point, label = corrective_point(target, prediction, np.random.default_rng(seed), placement)
        assert label == FOREGROUND
        assert inside(fn, point)


@pytest.mark.parametrize("placement", ["center", "random"])
def test_spill_over_gives_background_point_inside_it(placement):
    target = rectangle()
    prediction = target.copy()
    prediction[0:4, :] = True  # a band above the object: false positives only
    small_miss = (4, 6)
    prediction[small_miss] = False  # one missed pixel: the smaller error loses
    fn, fp = error_regions(target, prediction)
    assert fp.sum() > fn.sum() == 1
    for seed in range(30):
        point, label = corrective_point(target, prediction, np.random.default_rng(seed), placement)
        assert label == BACKGROUND
        assert inside(fp, point)
        assert not inside(target, point)


def test_centre_placement_is_far_from_the_error_boundary():
    target = rectangle((30, 30), rows=(0, 29), cols=(0, 29))
    prediction = np.ones_like(target)
    prediction[10:19, 5:14] = False  # a 9x9 hole: its centre is (x=9, y=14)
    point, label = corrective_point(target, prediction, np.random.default_rng(0), "center")
    assert label == FOREGROUND
    np.testing.assert_array_equal(point, [9, 14])


def test_perfect_prediction_needs_no_correction_and_bad_input_is_refused():
    target = rectangle()
    assert corrective_point(target, target.copy(), np.random.default_rng(0)) is None
    with pytest.raises(ValueError, match="shape"):
        corrective_point(target, target[:-1], np.random.default_rng(0))
    with pytest.raises(ValueError, match="placement"):
        corrective_point(target, ~target, np.random.default_rng(0), "edge")
    with pytest.raises(ValueError, match="empty"):
        random_point(np.zeros((4, 4), bool), np.random.default_rng(0))
