"""Automatic segmentation: NMS, stability score, mask cleaning, painting, linking planes
into 3D, the classical detector, and grid / box modes end to end with the tiny SAM."""

import numpy as np
import pytest

from napari_sam.core.automatic import (
    GridConfig,
    Progress,
    _Candidate,
    _cut_by_view,
    box_nms,
    boxes_from_labels,
    clean_mask,
    detect_boxes,
    grid_points,
    iter_from_boxes,
    iter_grid,
    link_planes,
    masks_to_labels,
    run,
    segment_detections,
    segment_grid,
    stability_score,
)
from napari_sam.core.embeddings import Embeddings
from napari_sam.core.tiling import Tile
from tests.conftest import drain

# -- building blocks ---------------------------------------------------------------------------


def test_box_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array(
        [
            [0, 0, 10, 10],  # IoU with box 2: 90 / 100 = 0.9
            [1, 1, 11, 11],  # IoU with box 2: 72 / 118 = 0.61
            [0, 0, 10, 9],  # best score
            [20, 20, 30, 30],  # alone
        ],
        float,
    )
    scores = [0.9, 0.8, 0.95, 0.5]
    assert box_nms(boxes, scores, 0.7).tolist() == [2, 1, 3]
    assert box_nms(boxes, scores, 0.5).tolist() == [2, 3]
    assert box_nms(boxes, scores, 0.95).tolist() == [2, 0, 1, 3]
    # equal scores: the earlier box wins
    assert box_nms([[0, 0, 4, 4], [0, 0, 4, 4]], [1.0, 1.0], 0.5).tolist() == [0]
    assert box_nms(np.zeros((0, 4)), [], 0.5).tolist() == []
    with pytest.raises(ValueError, match="scores"):
        box_nms(boxes, [1.0], 0.5)


def test_stability_score_on_hand_made_logits():
    logits = np.full((4, 4), -5.0)
    logits[0, :2] = 3.0  # above +1: 2 pixels
    logits[1, :] = 0.5  # between -1 and +1: 4 pixels
    logits[2, :2] = -0.5  # 2 more above -1
    assert stability_score(logits, offset=1.0) == pytest.approx(2 / 8)
    assert stability_score(logits, offset=0.25) == pytest.approx(1.0)  # 6 pixels at both cuts
    stack = np.stack([logits, np.full((4, 4), -9.0), np.full((4, 4), 9.0)])
    np.testing.assert_allclose(stability_score(stack, 1.0), [0.25, 1.0, 1.0])  # empty counts as stable
    # the threshold moves both cuts: nothing above 3.5, 2 pixels above 1.5
    assert stability_score(logits, offset=1.0, threshold=2.5) == pytest.approx(0.0)


def test_grid_points_sit_at_cell_centres():
    pts = grid_points((0, 10, 100, 120), 2)
    np.testing.assert_allclose(pts, [[105, 2.5], [115, 2.5], [105, 7.5], [115, 7.5]])
    assert grid_points((0, 64, 0, 64), 32).shape == (1024, 2)
    with pytest.raises(ValueError):
        grid_points((0, 10, 0, 10), 0)


def test_clean_mask_fills_small_holes_and_removes_small_islands():
    mask = np.zeros((30, 30), bool)
    mask[2:20, 2:20] = True
    mask[8:11, 8:11] = False  # a 9-pixel hole
    mask[25:27, 25:27] = True  # a 4-pixel island
    cleaned = clean_mask(mask, 10)
    assert cleaned[8:11, 8:11].all() and not cleaned[25:27, 25:27].any()
    assert cleaned.sum() == 18 * 18
    cleaned = clean_mask(mask, 5)  # the hole is larger than 5 pixels: it stays
    assert not cleaned[8:11, 8:11].any() and not cleaned[25:27, 25:27].any()
    np.testing.assert_array_equal(clean_mask(mask, 0), mask)


def _cand(region, mask, iou=0.9):
    return _Candidate(region, np.asarray(mask, bool), iou, 0.99)


def test_masks_to_labels_paints_large_first_without_overlaps():
    big = _cand((0, 10, 0, 10), np.ones((10, 10)), 0.8)
    small = _cand((2, 5, 2, 5), np.ones((3, 3)), 0.95)
    twin = _cand((2, 5, 2, 5), np.ones((3, 3)), 0.5)  # as large as `small`, painted after it
    other = _cand((20, 24, 20, 26), np.ones((4, 6)), 0.9)
    result = masks_to_labels((30, 30), [small, twin, big, other])
    # ids by area: big (100), other (24), then the 3x3 one; the smaller object lies on
    # the larger one, and `twin` covers `small` entirely, which disappears
    assert result.n_objects == 3
    assert result.labels.dtype == np.uint32
    assert result.area.tolist() == [91, 24, 9]
    np.testing.assert_allclose(result.iou, [0.8, 0.9, 0.5])
    assert (result.labels[2:5, 2:5] == 3).all() and result.labels[0, 0] == 1 and result.labels[21, 21] == 2
    # too small after painting: dropped, ids stay consecutive
    result = masks_to_labels((30, 30), [small, big, other], min_area=10)  # small has 9
    assert result.area.tolist() == [91, 24] and set(np.unique(result.labels)) == {0, 1, 2}
    assert result.scores()[0] == {"id": 1, "iou": 0.8, "stability": 0.99, "area": 91}


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


# -- linking planes ----------------------------------------------------------------------------


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


# -- detector ----------------------------------------------------------------------------------


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


# -- end to end with the tiny SAM ------------------------------------------------------------


@pytest.fixture(scope="module")
def crop(nuclei_2d):
    image, labels = nuclei_2d
    return image[:96, :128], labels[:96, :128]


@pytest.fixture(scope="module")
def tiled(tiny_sam, crop):
    """A part of the crop embedded as two small tiles side by side, shared by the tests
    (embedding is what costs)."""
    image = crop[0][:48, :96]
    emb = Embeddings(image, tiny_sam, cache=False, tile=48, halo=16)
    assert emb.grid.grid_shape == (1, 2)
    return emb


def _check_result(result, shape):
    labels = result.labels
    assert labels.shape == shape and labels.dtype == np.uint32
    ids = np.unique(labels[labels > 0])
    np.testing.assert_array_equal(ids, np.arange(1, result.n_objects + 1))
    np.testing.assert_array_equal(np.bincount(labels.ravel(), minlength=result.n_objects + 1)[1:], result.area)
    assert len(result.iou) == len(result.stability) == result.n_objects


def test_grid_mode_end_to_end(tiny_sam, crop):
    image, _ = crop
    lenient = GridConfig(points_per_side=3, pred_iou_thresh=-1e9, stability_thresh=0.0, min_area=0)
    emb = Embeddings(image, tiny_sam, cache=False)
    gen = iter_grid(emb, 0, lenient)
    reports, result = drain(gen)
    assert reports == [Progress(1, 1, 0, (0, 0), "tiles")]
    _check_result(result, image.shape)
    assert result.n_objects >= 1  # nothing is filtered: the 27 candidates leave something
    assert (result.stability >= 0).all() and (result.stability <= 1).all()
    strict = GridConfig(points_per_side=3, pred_iou_thresh=1e9)
    nothing = segment_grid(image, tiny_sam, strict)  # the one-call version
    assert nothing.n_objects == 0 and not nothing.labels.any()


def test_grid_mode_over_tiles(tiled):
    config = GridConfig(points_per_side=2, pred_iou_thresh=-1e9, stability_thresh=0.0, min_area=0)
    reports, result = drain(iter_grid(tiled, 0, config))
    assert [r.done for r in reports] == [1, 2] and reports[0].total == 2
    assert [r.tile for r in reports] == [(0, 0), (0, 1)]
    _check_result(result, tiled.grid.shape)


def test_box_mode_end_to_end(tiny_sam, crop, tiled):
    image, labels = crop[0][:48, :96], crop[1][:48, :96]
    boxes, ids = boxes_from_labels(labels, min_area=20)
    assert len(boxes) >= 3
    # boxes from a label image, one tile
    result = segment_detections(image, tiny_sam, labels=labels, min_area=20)
    _check_result(result, image.shape)
    assert result.n_objects <= len(boxes)
    # over tiles: boxes inside a tile's view are batched, the others go across tiles
    emb = tiled
    boxes = np.vstack([boxes, [[10, 5, 90, 40]]])  # wider than a tile's view
    reports, result = drain(iter_from_boxes(emb, 0, boxes, batch_size=2))
    assert reports[-1].done == reports[-1].total == len(boxes) and all(r.stage == "boxes" for r in reports)
    _check_result(result, image.shape)
    assert sum(r.tile is None for r in reports) == 1  # the wide box went across tiles
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        run(iter_from_boxes(emb, 0, [1, 2, 3]))


def test_recommended_settings_follow_the_model(tiny_model):
    from napari_sam.core.automatic import GridConfig, recommended
    from napari_sam.core.models import load_model

    assert recommended(tiny_model).mode == "auto" and recommended(tiny_model).grid == GridConfig()
    default = recommended(load_model("default"))
    assert (default.mode, default.detector) == ("boxes", "log")
    assert default.grid.pred_iou_thresh == 0.6 and default.grid.stability_thresh == 0.8
    tiny_model.checkpoint_metadata["automatic"] = {"mode": "boxes", "grid": {"points_per_side": 8}}
    try:
        advice = recommended(tiny_model)
        assert advice.mode == "boxes" and advice.grid.points_per_side == 8 and advice.detector == "otsu"
    finally:
        del tiny_model.checkpoint_metadata["automatic"]


def test_malformed_advice_in_a_checkpoint_is_ignored_with_a_warning(tiny_model):
    from napari_sam.core.automatic import Recommended, recommended

    for bad in ({"mode": "everything"}, {"colour": "red"}, {"grid": {"points": 3}}, "boxes"):
        tiny_model.checkpoint_metadata["automatic"] = bad
        try:
            with pytest.warns(RuntimeWarning, match="ignoring the checkpoint's advice"):
                assert recommended(tiny_model) == Recommended()
        finally:
            del tiny_model.checkpoint_metadata["automatic"]
