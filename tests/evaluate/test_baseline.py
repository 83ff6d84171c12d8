"""The seeded-watershed baseline: real nuclei from a point and from a box, touching
objects kept apart, background points, and bad input."""

import numpy as np
import pytest
from scipy import ndimage

from napari_sam.core.prompt_simulation import bounding_box, interior_point
from napari_sam.evaluate.baseline import WatershedBaseline, watershed_segment


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.fixture(scope="module")
def nucleus(nuclei_2d):
    """The largest nucleus with no other nucleus within 3 pixels, away from the border."""
    image, labels = nuclei_2d
    best, best_area = None, 0
    for i in np.unique(labels)[1:]:
        m = labels == i
        ring = ndimage.binary_dilation(m, iterations=3) & ~m
        rows, cols = np.nonzero(m)
        if (labels[ring] > 0).any() or rows.min() < 5 or cols.min() < 5:
            continue
        if rows.max() > labels.shape[0] - 6 or cols.max() > labels.shape[1] - 6:
            continue
        if m.sum() > best_area:
            best, best_area = m, m.sum()
    assert best_area > 300
    return image, best


@pytest.fixture(scope="module")
def baseline(nuclei_2d):
    ws = WatershedBaseline()
    ws.set_image(nuclei_2d[0])
    return ws


def test_a_real_nucleus_from_one_point(baseline, nucleus):
    _, mask = nucleus
    pred = baseline.predict(points=[interior_point(mask)], labels=[1])
    assert pred.dtype == bool and pred.shape == mask.shape
    assert _iou(pred, mask) > 0.85


def test_a_real_nucleus_from_its_box(baseline, nucleus):
    _, mask = nucleus
    pred = baseline.predict(box=bounding_box(mask))
    assert _iou(pred, mask) > 0.85
    # the one-call function gives the same
    image, _ = nucleus
    np.testing.assert_array_equal(watershed_segment(image, box=bounding_box(mask)), pred)


def _two_touching_disks():
    yy, xx = np.mgrid[:64, :96]
    a = (yy - 32) ** 2 + (xx - 30) ** 2 <= 144
    b = (yy - 32) ** 2 + (xx - 52) ** 2 <= 144  # centres 22 apart, radius 12: they overlap
    image = np.full((64, 96), 20.0)
    image[a | b] = 200
    image += np.random.default_rng(0).normal(0, 3, image.shape)
    return image, a, b


def test_touching_objects_stay_apart():
    image, a, b = _two_touching_disks()
    ws = WatershedBaseline()
    ws.set_image(image)
    pred = ws.predict(points=[[30, 32]])  # (x, y): the centre of disk a
    assert _iou(pred, a) > 0.85
    assert (pred & b & ~a).sum() < 0.1 * (b & ~a).sum()
    pred = ws.predict(box=[40, 20, 64, 44])  # the box of disk b
    assert _iou(pred, b) > 0.8
    assert (pred & a & ~b).sum() < 0.1 * (a & ~b).sum()


def test_background_point_excludes_a_region():
    image, a, b = _two_touching_disks()
    ws = WatershedBaseline()
    ws.set_image(image)
    both = [17, 19, 65, 45]  # a box around both disks
    pred = ws.predict(points=[[30, 32], [56, 32]], labels=[1, 0], box=both)
    assert _iou(pred, a) > 0.85 and not pred[32, 56]


def test_bad_input():
    ws = WatershedBaseline()
    with pytest.raises(RuntimeError, match="set_image"):
        ws.predict(points=[[1, 1]])
    ws.set_image(np.random.default_rng(0).random((32, 32)))
    with pytest.raises(ValueError, match="foreground point"):
        ws.predict(points=[[4, 4]], labels=[0])
    with pytest.raises(ValueError, match="outside"):
        ws.predict(points=[[40, 4]])
    with pytest.raises(ValueError, match="label"):
        ws.predict(points=[[4, 4]], labels=[1, 1])
    with pytest.raises(ValueError, match="local_block"):
        WatershedBaseline(local_block=50)
    # a flat image has no object: an empty mask, not an error
    flat = WatershedBaseline()
    flat.set_image(np.zeros((16, 16)))
    assert not flat.predict(box=[2, 2, 10, 10]).any()
