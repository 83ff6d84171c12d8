"""The advice on automatic segmentation that a checkpoint carries."""

import pytest

from napari_sam.auto import AISSettings, GridConfig, Recommended, recommended


def test_recommended_settings_follow_the_model(tiny_model):
    from napari_sam.core.models import load_model

    assert recommended(tiny_model).mode == "auto" and recommended(tiny_model).grid == GridConfig()
    default_model = load_model("default")
    default = recommended(default_model)
    # AIS with its shipped decoder; LoG boxes stay the detector for the boxes mode
    assert (default.mode, default.detector) == ("ais", "log")
    assert default.ais.boundary_distance_threshold == 0.6 and default.ais.min_size == 25
    # H&E read as its haematoxylin: smoothing that follows the nuclei's size
    assert default.ais_stained == AISSettings(boundary_distance_threshold=0.7, foreground_threshold=0.4, min_size=25,
                                              distance_smoothing_per_diameter=0.143)
    assert default.grid.pred_iou_thresh == 0.6 and default.grid.stability_thresh == 0.8
    tiny_model.metadata["automatic"] = {"mode": "boxes", "grid": {"points_per_side": 8}}
    try:
        advice = recommended(tiny_model)
        assert advice.mode == "boxes" and advice.grid.points_per_side == 8 and advice.detector == "otsu"
    finally:
        del tiny_model.metadata["automatic"]


def test_stained_planes_advice_is_what_differs_from_the_ais_advice(tiny_model):
    tiny_model.metadata["automatic"] = {"ais": {"min_size": 9, "boundary_distance_threshold": 0.6},
                                        "ais_stained": {"boundary_distance_threshold": 0.7}}
    try:
        advice = recommended(tiny_model)
        assert advice.ais == AISSettings(min_size=9, boundary_distance_threshold=0.6)
        assert advice.ais_stained == AISSettings(min_size=9, boundary_distance_threshold=0.7)
        del tiny_model.metadata["automatic"]["ais_stained"]
        assert recommended(tiny_model).ais_stained is None
    finally:
        del tiny_model.metadata["automatic"]


def test_malformed_advice_in_a_checkpoint_is_ignored_with_a_warning(tiny_model):
    for bad in ({"mode": "everything"}, {"colour": "red"}, {"grid": {"points": 3}}, "boxes",
                {"ais_stained": {"min_size": -1}}, {"ais_stained": {"sigma": 2}}):
        tiny_model.metadata["automatic"] = bad
        try:
            with pytest.warns(RuntimeWarning, match="ignoring the checkpoint's advice"):
                assert recommended(tiny_model) == Recommended()
        finally:
            del tiny_model.metadata["automatic"]
