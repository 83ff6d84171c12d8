"""Candidate masks: NMS, stability score, mask cleaning, painting into labels."""

import numpy as np
import pytest

from napari_sam.auto.candidates import Candidate, box_nms, clean_mask, masks_to_labels, stability_score


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
    return Candidate(region, np.asarray(mask, bool), iou, 0.99)


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
