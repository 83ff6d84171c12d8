"""Detector-prompted mode: boxes from labels, the classical detector, and boxes through
the tiny SAM on one tile and across tiles."""

import numpy as np
import pytest

from napari_sam.auto import boxes_from_labels, detect_boxes, iter_from_boxes, run, segment_detections
from tests.conftest import drain


def test_boxes_from_labels():
    labels = np.zeros((20, 20), np.uint16)
    labels[2:5, 3:9] = 4
    labels[10:15, 7] = 9  # one pixel wide
    labels[18, 18] = 2  # one pixel
    boxes, ids = boxes_from_labels(labels)
    assert ids.tolist() == [2, 4, 9]
    np.testing.assert_array_equal(boxes, [[18, 18, 19, 19], [3, 2, 8, 4], [7, 10, 8, 14]])
    boxes, ids = boxes_from_labels(labels, min_area=2)
    assert ids.tolist() == [4, 9]


def _blobs(speck: bool = True):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :160]
    image = rng.normal(100, 5, (128, 160))
    centres = [(30, 40, 8), (90, 50, 10), (60, 120, 7)]
    for y, x, r in centres:
        image += 800 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * (r / 1.5) ** 2))
    if speck:
        image[5:7, 150:152] += 800  # a 4-pixel speck: below min_area
    return image.astype(np.float32), centres


@pytest.mark.parametrize("method", ["otsu", "log"])
def test_detector_finds_synthetic_blobs(method):
    # the speck is too small for Otsu's min_area (LoG, a blob detector, finds it)
    image, centres = _blobs(speck=method == "otsu")
    boxes = detect_boxes(image, method=method, min_area=20)
    assert len(boxes) == 3
    for y, x, r in centres:
        holding = [b for b in boxes if b[0] <= x <= b[2] and b[1] <= y <= b[3]]
        assert len(holding) == 1
        x0, y0, x1, y1 = holding[0]
        # about the blob's size: not a speck, not the whole image
        assert r / 2 < (x1 - x0) / 2 < 3 * r and r / 2 < (y1 - y0) / 2 < 3 * r
    with pytest.raises(ValueError, match="method"):
        detect_boxes(image, method="magic")


def test_box_mode_end_to_end(tiny_sam, crop, tiled, check_result):
    image, labels = crop[0][:48, :96], crop[1][:48, :96]
    boxes, _ids = boxes_from_labels(labels, min_area=20)
    assert len(boxes) >= 3
    # boxes from a label image, one tile
    result = segment_detections(image, tiny_sam, labels=labels, min_area=20)
    check_result(result, image.shape)
    assert result.n_objects <= len(boxes)
    # over tiles: boxes inside a tile's view are batched, the others go across tiles
    emb = tiled
    boxes = np.vstack([boxes, [[10, 5, 90, 40]]])  # wider than a tile's view
    reports, result = drain(iter_from_boxes(emb, 0, boxes, batch_size=2))
    assert reports[-1].done == reports[-1].total == len(boxes) and all(r.stage == "boxes" for r in reports)
    check_result(result, image.shape)
    assert sum(r.tile is None for r in reports) == 1  # the wide box went across tiles
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        run(iter_from_boxes(emb, 0, [1, 2, 3]))
