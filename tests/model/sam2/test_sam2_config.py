"""SAM 2.1 configurations and checkpoint loading: the four released sizes have exactly the
official keys and shapes, official ``model:`` nodes convert one-to-one, sizes are told
apart from a state dict, and a checkpoint that does not fit is refused in one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from _sets import load_set, reference_sets

from napari_sam.model.checkpoint import CheckpointError
from napari_sam.model.sam2 import (
    CONFIGS,
    build_sam2,
    config_from_dict,
    config_from_official,
    config_to_dict,
    infer_sam2_config,
    sam2_from_state_dict,
)
from napari_sam.model.sam2.config import HieraConfig, ImageEncoderConfig, Sam2Config
from napari_sam.model.sam2.sam2 import expected_shapes

SHAPES = Path(__file__).resolve().parents[2] / "reference" / "sam2" / "official_state_dict_shapes.json"
NAMES = ["sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large"]


@pytest.fixture(scope="module")
def official() -> dict:
    if not SHAPES.is_file():
        pytest.skip("tests/reference/sam2/official_state_dict_shapes.json is missing")
    return json.loads(SHAPES.read_text())


def test_the_four_sizes_are_configured():
    assert sorted(CONFIGS) == sorted(NAMES)
    assert all(CONFIGS[name].name == name for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_keys_and_shapes_are_the_official_ones(official, name):
    ours = expected_shapes(name)
    theirs = {key: tuple(shape) for key, shape in official[name].items()}
    assert sorted(set(theirs) - set(ours)) == []
    assert sorted(set(ours) - set(theirs)) == []
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}


@pytest.mark.parametrize("name", NAMES)
def test_official_nodes_convert_to_our_configurations(official, name):
    node = official["_configs"][name]
    ours = config_from_official(node, name=name)
    # build_sam2 (images) leaves the two video-predictor overrides at their defaults
    assert ours == dataclasses.replace(CONFIGS[name], binarize_mask_from_pts_for_mem_enc=False, fill_hole_area=0)
    assert ours.decoder_extra.dynamic_multimask_via_stability


@pytest.mark.parametrize("name", NAMES)
def test_a_size_is_recognised_from_its_state_dict(name):
    with torch.device("meta"):
        state = build_sam2(name).state_dict()
    assert infer_sam2_config(state) is CONFIGS[name]
    assert infer_sam2_config({"model": state}) is CONFIGS[name]


def test_an_unknown_state_dict_is_refused_with_its_width():
    with torch.device("meta"):
        state = build_sam2("sam2.1_hiera_tiny").state_dict()
    del state["no_mem_embed"]
    with pytest.raises(CheckpointError, match="Hiera width 96, 12 blocks.*record its configuration in the checkpoint"):
        infer_sam2_config(state)


def test_configurations_round_trip_through_json():
    for config in CONFIGS.values():
        data = json.loads(json.dumps(config_to_dict(config)))
        assert config_from_dict(data) == config


def test_a_bad_official_node_names_the_culprit():
    node = config_to_dict(CONFIGS["sam2.1_hiera_tiny"])
    node["image_encoder"]["trunk"]["window_size"] = 3
    with pytest.raises(ValueError, match=r"model\.image_encoder\.trunk: unknown key\(s\) \['window_size'\]"):
        config_from_official(node)
    node = config_to_dict(CONFIGS["sam2.1_hiera_tiny"])
    del node["memory_encoder"]["out_dim"]
    with pytest.raises(ValueError, match=r"model\.memory_encoder: .*out_dim"):
        config_from_official(node)


def test_trunk_and_neck_must_agree():
    tiny = CONFIGS["sam2.1_hiera_tiny"].image_encoder
    with pytest.raises(ValueError, match="backbone_channel_list"):
        ImageEncoderConfig(HieraConfig(embed_dim=112, num_heads=2), tiny.neck)
    with pytest.raises(ValueError, match="global_att_blocks"):
        HieraConfig(stages=(1, 1), window_spec=(8, 4), global_att_blocks=(5,), q_pool=1)
    with pytest.raises(ValueError, match="unknown SAM 2 configuration"):
        build_sam2("sam2_hiera_huge")


@pytest.fixture(scope="module")
def reference_state():
    sets = reference_sets()
    if not sets:
        pytest.skip("no SAM 2.1 reference sets")
    config, state, _, _ = load_set(sets[0])
    return config_from_official(config), state


def test_official_checkpoints_load_strictly(reference_state):
    config, state = reference_state
    model = sam2_from_state_dict({"model": state}, config)
    assert isinstance(config, Sam2Config) and not model.training
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert model.source is None
    again = sam2_from_state_dict(state, config)  # the bare state dict is accepted too
    assert torch.equal(again.no_mem_embed, state["no_mem_embed"])


def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line(reference_state):
    config, state = reference_state
    broken = dict(state)
    del broken["sam_mask_decoder.conv_s0.weight"]
    broken["image_encoder.trunk.extra"] = torch.zeros(1)
    broken["no_mem_embed"] = torch.zeros(1, 1, 7)
    with pytest.raises(CheckpointError) as err:
        sam2_from_state_dict({"model": broken}, config)
    message = str(err.value)
    assert "\n" not in message
    assert "1 missing key(s): sam_mask_decoder.conv_s0.weight" in message
    assert "1 unexpected key(s): image_encoder.trunk.extra" in message
    assert "no_mem_embed: checkpoint (1, 1, 7) vs model (1, 1, 32)" in message
