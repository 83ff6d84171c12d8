"""Linking the instances of consecutive planes into 3D objects."""

import numpy as np
import pytest

from napari_sam.auto import link_planes


def _square(shape, y, x, h, w, value, into=None):
    out = np.zeros(shape, np.uint16) if into is None else into
    out[y : y + h, x : x + w] = value
    return out


def test_link_planes_gives_consistent_ids_with_a_split_and_a_merge():
    shape = (40, 60)
    p0 = _square(shape, 5, 5, 10, 10, 5)
    _square(shape, 5, 30, 10, 10, 9, p0)
    # the same two objects, shifted by a pixel, with other ids
    p1 = _square(shape, 6, 5, 10, 10, 3)  # object A is now 3, B is 1
    _square(shape, 6, 31, 10, 10, 1, p1)
    # A splits: a larger left piece (7 columns) and a smaller right piece (3 columns)
    p2 = _square(shape, 6, 5, 10, 7, 1)
    _square(shape, 6, 12, 10, 3, 2, p2)
    _square(shape, 6, 31, 10, 10, 7, p2)
    # the two pieces of A merge again; B is gone and a new object appears far away
    p3 = _square(shape, 6, 5, 10, 10, 4)
    _square(shape, 30, 50, 5, 5, 8, p3)
    out = link_planes([p0, p1, p2, p3])
    assert out.shape == (4, *shape) and out.dtype == np.uint32
    a, b = out[0, 10, 10], out[0, 10, 35]
    assert (a, b) == (1, 2)  # numbered in order of first appearance
    assert out[1, 10, 10] == a and out[1, 10, 35] == b
    assert out[2, 10, 8] == a  # the larger piece continues A
    assert out[2, 10, 13] == 3  # the smaller piece is a new object
    assert out[2, 10, 35] == b
    assert out[3, 10, 8] == a and out[3, 10, 13] == a  # merged: continues A
    assert out[3, 32, 52] == 4
    # every plane keeps its pixels: same foreground, one 3D id per 2D object
    for z, p in enumerate([p0, p1, p2, p3]):
        np.testing.assert_array_equal(out[z] > 0, p > 0)


def test_link_planes_respects_min_iou():
    shape = (20, 30)
    p0 = _square(shape, 0, 0, 10, 10, 1)
    p1 = _square(shape, 0, 6, 10, 10, 1)  # IoU = 40 / 160 = 0.25
    assert link_planes([p0, p1], min_iou=0.2)[1, 5, 12] == 1
    assert link_planes([p0, p1], min_iou=0.3)[1, 5, 12] == 2
    with pytest.raises(ValueError, match="plane 1"):
        link_planes([p0, p1[:5]])
