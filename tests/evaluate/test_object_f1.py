"""Object-level F1, the measure of 3D linking: splits and merges along z cost matches."""

import numpy as np
import pytest

from napari_sam.evaluate.metrics import object_f1


def two_columns() -> np.ndarray:
    gt = np.zeros((6, 10, 10), np.int32)
    gt[:, 1:4, 1:4] = 1
    gt[:, 6:9, 6:9] = 2
    return gt


def test_a_perfect_volume_scores_one():
    gt = two_columns()
    assert object_f1(gt, gt * 5) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 2, "n_gt": 2, "n_pred": 2}


def test_an_object_split_along_z_costs_its_match():
    gt = two_columns()
    pred = gt.copy()
    pred[3:][gt[3:] == 1] = 7  # object 1 gets a new id half way: two 3D objects of IoU 0.5 each
    out = object_f1(gt, pred)
    assert out["tp"] == 1 and out["n_pred"] == 3
    assert out["precision"] == pytest.approx(1 / 3) and out["recall"] == pytest.approx(0.5)
    assert out["f1"] == pytest.approx(2 * 1 / 5)


def test_merged_objects_cost_a_match_and_empty_volumes_score_one():
    gt = two_columns()
    merged = (gt > 0).astype(np.int32)
    assert object_f1(gt, merged)["tp"] == 0
    empty = np.zeros_like(gt)
    assert object_f1(empty, empty)["f1"] == 1.0
    assert object_f1(gt, empty) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "n_gt": 2, "n_pred": 0}
