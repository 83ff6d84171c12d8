"""Every automatic mode behind one call, and the advice that picks it.

A small random SAM serves all modes; its instance decoder is a stand-in that answers with
the maps of known discs (``KnownMaps``), so that AIS must find exactly those discs and APG
must prompt at them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam.auto.ais import AISSettings, instances_from_maps
from napari_sam.auto.apg import APGSettings, segment_apg
from napari_sam.auto.boxes import detect_boxes, iter_from_boxes
from napari_sam.auto.grid import GridConfig, iter_grid
from napari_sam.auto.modes import (
    MODES,
    available_modes,
    iter_segment_plane,
    iter_segment_volume,
    segment_plane,
    segment_volume,
)
from napari_sam.auto.recommend import Recommended, recommended
from napari_sam.auto.results import run
from napari_sam.core.embeddings import Embeddings
from napari_sam.model.sam import build_sam
from napari_sam.train.instance_targets import instance_targets
from tests.auto.test_ais import discs, matched_ious
from tests.auto.test_apg import SMALL, KnownMaps, bright_discs
from tests.conftest import drain


@pytest.fixture(scope="module")
def bare():
    """A small random SAM without an instance decoder."""
    torch.manual_seed(0)
    return build_sam(SMALL).eval()


@pytest.fixture(scope="module")
def plane():
    truth, image = bright_discs((64, 80), [(20, 20), (40, 55), (50, 15)], [10, 12, 8])
    return truth, image


@pytest.fixture
def model(bare):
    """The same SAM given a decoder slot; tests set ``model.instance_decoder``."""
    try:
        yield bare
    finally:
        bare.instance_decoder = None
        bare.metadata.pop("automatic", None)


def test_available_modes_follow_the_decoder(model):
    assert MODES == ("ais", "apg", "auto", "boxes")
    assert available_modes(model) == ("auto", "boxes")
    model.instance_decoder = KnownMaps(np.zeros((3, 4, 4)), [])
    assert available_modes(model) == MODES


def test_every_mode_through_the_dispatcher(model, plane):
    truth, image = plane
    emb = Embeddings(image, model, cache=False)
    maps = instance_targets(truth)

    model.instance_decoder = KnownMaps(maps, emb.grid)
    reports, ais = drain(iter_segment_plane(emb, 0, "ais"))
    assert ais.dtype == np.uint32 and ais.shape == (64, 80) and [r.stage for r in reports] == ["tiles"]
    np.testing.assert_array_equal(ais, instances_from_maps(*maps, AISSettings()))
    assert ais.max() == 3 and min(matched_ious(truth, ais)) > 0.9
    # overrides are the settings' fields
    model.instance_decoder = KnownMaps(maps, emb.grid)
    big_only = segment_plane(emb, 0, "ais", min_size=300)
    np.testing.assert_array_equal(big_only, instances_from_maps(*maps, AISSettings(min_size=300)))
    assert big_only.max() == 2

    model.instance_decoder = KnownMaps(maps, emb.grid)
    seen = []
    apg = segment_plane(emb, 0, "apg", progress=seen.append, min_size=0, nms_threshold=0.5)
    expected = segment_apg(emb, 0, KnownMaps(maps, emb.grid), APGSettings(min_size=0, nms_threshold=0.5))
    assert apg.dtype == np.uint32 and apg.max() >= 1
    np.testing.assert_array_equal(apg, expected)
    assert [(r.stage, r.total) for r in seen] == [("tiles", 1), ("prompts", 3)]

    grid = segment_plane(emb, 0, "auto", points_per_side=2, pred_iou_thresh=0.0, stability_thresh=0.0)
    config = GridConfig(points_per_side=2, pred_iou_thresh=0.0, stability_thresh=0.0)
    np.testing.assert_array_equal(grid, run(iter_grid(emb, 0, config)).labels)
    assert grid.dtype == np.uint32

    boxes = detect_boxes(image, "otsu", 25)
    assert len(boxes) == 3
    found = segment_plane(emb, 0, "boxes", detector="otsu")
    np.testing.assert_array_equal(found, run(iter_from_boxes(emb, 0, boxes, 64, 25)).labels)
    assert found.dtype == np.uint32

    # no mode: the advice's, and a model with a decoder and no advice gets AIS
    model.instance_decoder = KnownMaps(maps, emb.grid)
    np.testing.assert_array_equal(segment_plane(emb, 0), ais)
    # advice given by hand
    advice = Recommended(mode="ais", ais=AISSettings(min_size=300))
    model.instance_decoder = KnownMaps(maps, emb.grid)
    np.testing.assert_array_equal(segment_plane(emb, 0, advice=advice), big_only)


def test_planes_read_as_a_stain_take_the_advice_for_stained_planes(model, plane):
    truth, image = plane
    rgb = np.repeat(255 - image[..., None], 3, axis=-1)  # dark discs on a bright ground
    maps = instance_targets(truth)
    advice = Recommended(mode="ais", ais=AISSettings(), ais_stained=AISSettings(min_size=300))
    for channel, expected in (("haematoxylin", AISSettings(min_size=300)), ("rgb", AISSettings())):
        emb = Embeddings(rgb, model, cache=False, axes="YXC", channel=channel)
        assert emb.source.stain == (channel if channel == "haematoxylin" else None)
        model.instance_decoder = KnownMaps(maps, emb.grid)
        np.testing.assert_array_equal(segment_plane(emb, 0, advice=advice), instances_from_maps(*maps, expected))
    # a sigma given in pixels replaces the advice's sigma that follows the objects' size
    emb = Embeddings(rgb, model, cache=False, axes="YXC", channel="haematoxylin")
    scaled = Recommended(mode="ais", ais_stained=AISSettings(distance_smoothing_per_diameter=0.5))
    model.instance_decoder = KnownMaps(maps, emb.grid)
    np.testing.assert_array_equal(segment_plane(emb, 0, advice=scaled, distance_smoothing=3.0),
                                  instances_from_maps(*maps, AISSettings(distance_smoothing=3.0)))


def test_the_checkpoints_advice_sets_the_mode_and_its_settings(model, plane):
    truth, image = plane
    emb = Embeddings(image, model, cache=False)
    model.instance_decoder = KnownMaps(instance_targets(truth), emb.grid)
    model.metadata["automatic"] = {"mode": "apg", "apg": {"min_size": 0, "nms_threshold": 0.5}}
    labels = segment_plane(emb, 0)
    expected = segment_apg(emb, 0, KnownMaps(instance_targets(truth), emb.grid),
                           APGSettings(min_size=0, nms_threshold=0.5))
    np.testing.assert_array_equal(labels, expected)


def test_bad_modes_and_settings_are_one_clear_error(model, plane):
    emb = Embeddings(plane[1], model, cache=False)
    with pytest.raises(ValueError, match="unknown automatic mode 'everything'"):
        segment_plane(emb, 0, "everything")
    with pytest.raises(ValueError, match="mode 'ais' needs an instance decoder.*its modes are auto, boxes"):
        segment_plane(emb, 0, "ais")
    with pytest.raises(ValueError, match="mode 'apg' needs an instance decoder"):
        segment_volume(emb, "apg")
    with pytest.raises(ValueError, match="mode 'auto' has no setting 'min_size_px'"):
        segment_plane(emb, 0, "auto", min_size_px=3)
    with pytest.raises(ValueError, match="mode 'boxes' has no setting 'points_per_side'"):
        segment_plane(emb, 0, "boxes", points_per_side=3)
    with pytest.raises(ValueError, match="detector must be one of 'otsu', 'log'"):
        segment_plane(emb, 0, "boxes", detector="blobs")
    with pytest.raises(ValueError, match="points_per_side"):
        segment_plane(emb, 0, "auto", points_per_side=0)
    with pytest.raises(ValueError, match="link_iou"):
        segment_volume(emb, "auto", link_iou=2)
    with pytest.raises(ValueError, match="no planes"):
        segment_volume(emb, "auto", planes=[])
    model.instance_decoder = KnownMaps(np.zeros((3, 64, 80)), emb.grid)
    with pytest.raises(ValueError, match="mode 'apg' has no setting 'distance_smoothing'"):
        segment_plane(emb, 0, "apg", distance_smoothing=1.0)
    with pytest.raises(ValueError, match="APG setting nms_threshold"):
        segment_plane(emb, 0, "apg", nms_threshold=3)


def test_recommended_with_and_without_a_decoder(model):
    assert recommended(model) == Recommended()
    model.instance_decoder = KnownMaps(np.zeros((3, 4, 4)), [])
    assert recommended(model) == Recommended(mode="ais")
    model.metadata["automatic"] = {"mode": "boxes", "detector": "log"}
    assert (recommended(model).mode, recommended(model).detector) == ("boxes", "log")
    model.metadata["automatic"] = {"ais": {"min_size": 50}, "apg": {"nms_threshold": 0.8}, "detector": "log"}
    advice = recommended(model)
    assert advice.mode == "ais" and advice.ais == AISSettings(min_size=50)
    assert advice.apg == APGSettings(nms_threshold=0.8)
    for bad in ({"ais": {"min_size": -1}}, {"apg": {"colour": 1}}, {"mode": "everything"}, ["ais"]):
        model.metadata["automatic"] = bad
        with pytest.warns(RuntimeWarning, match="ignoring the checkpoint's advice"):
            assert recommended(model) == Recommended(mode="ais")


def test_decoder_advice_without_a_decoder_falls_back_with_a_warning(model):
    model.metadata["automatic"] = {"mode": "apg", "detector": "log", "apg": {"min_size": 5}}
    with pytest.warns(RuntimeWarning, match="advises mode 'apg' but the model has no instance decoder; using 'boxes'"):
        advice = recommended(model)
    assert (advice.mode, advice.detector, advice.apg.min_size) == ("boxes", "log", 5)
    model.metadata["automatic"] = {"mode": "ais", "grid": {"points_per_side": 8}}
    with pytest.warns(RuntimeWarning, match="using 'auto'"):
        advice = recommended(model)
    assert (advice.mode, advice.grid.points_per_side) == ("auto", 8)
    model.metadata["automatic"] = {"mode": "everything"}
    with pytest.warns(RuntimeWarning, match="ignoring"):
        assert recommended(model) == Recommended()


def test_a_volume_gets_one_id_per_3d_object(model):
    shape = (48, 64)
    truths = [discs(shape, [(24, 16 + z), (24, 46 - z)], [10, 9]) for z in range(3)]
    truths[2][truths[2] == 2] = 0  # the second object ends after two planes
    volume = np.stack([np.where(t > 0, 200, 30).astype(np.uint8) for t in truths])
    emb = Embeddings(volume, model, cache=False, axes="ZYX")
    model.instance_decoder = KnownMaps([instance_targets(t) for t in truths], emb.grid)
    reports, labels = drain(iter_segment_volume(emb, "ais"))
    assert labels.shape == (3, *shape) and labels.dtype == np.uint32
    assert [r.done for r in reports if r.stage == "planes"] == [1, 2, 3]
    left = {int(labels[z, 24, 16 + z]) for z in range(3)}
    right = {int(labels[z, 24, 46 - z]) for z in range(2)}
    assert len(left) == 1 and len(right) == 1 and left != right and 0 not in left | right
    np.testing.assert_array_equal(np.unique(labels), [0, 1, 2])
    assert labels[2, 24, 44] == 0
    # a subset of planes, in the order given
    model.instance_decoder = KnownMaps([instance_targets(truths[2]), instance_targets(truths[0])], emb.grid)
    part = segment_volume(emb, "ais", planes=[2, 0])
    assert part.shape == (2, *shape) and np.unique(part).tolist() == [0, 1, 2]
    assert part[0, 24, 18] == part[1, 24, 16] != 0


def test_names_resolve_from_the_package():
    import napari_sam.auto as auto

    assert auto.segment_plane is segment_plane and auto.MODES is MODES
    assert auto.available_modes is available_modes and auto.iter_segment_volume is iter_segment_volume
