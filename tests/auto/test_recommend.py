"""The advice on automatic segmentation that a checkpoint carries."""

import pytest

from napari_sam.auto import GridConfig, Recommended, recommended


def test_recommended_settings_follow_the_model(tiny_model):
    from napari_sam.core.models import load_model

    assert recommended(tiny_model).mode == "auto" and recommended(tiny_model).grid == GridConfig()
    default_model = load_model("default")
    default = recommended(default_model)
    # AIS with its shipped decoder; LoG boxes stay the detector for the boxes mode
    assert (default.mode, default.detector) == ("ais", "log")
    assert default.ais.boundary_distance_threshold == 0.6 and default.ais.min_size == 25
    assert default.grid.pred_iou_thresh == 0.6 and default.grid.stability_thresh == 0.8
    tiny_model.metadata["automatic"] = {"mode": "boxes", "grid": {"points_per_side": 8}}
    try:
        advice = recommended(tiny_model)
        assert advice.mode == "boxes" and advice.grid.points_per_side == 8 and advice.detector == "otsu"
    finally:
        del tiny_model.metadata["automatic"]


def test_malformed_advice_in_a_checkpoint_is_ignored_with_a_warning(tiny_model):
    for bad in ({"mode": "everything"}, {"colour": "red"}, {"grid": {"points": 3}}, "boxes"):
        tiny_model.metadata["automatic"] = bad
        try:
            with pytest.warns(RuntimeWarning, match="ignoring the checkpoint's advice"):
                assert recommended(tiny_model) == Recommended()
        finally:
            del tiny_model.metadata["automatic"]
