"""Our modules reproduce the official checkpoints' keys and shapes exactly, so official
state dicts load strictly; built on the meta device, so no weights are allocated."""

import json
import os
from pathlib import Path

import pytest
import torch

from napari_sam.model import (
    CONFIGS,
    CheckpointError,
    SamConfig,
    ViTConfig,
    build_sam,
    infer_config,
    sam_from_state_dict,
)

REPO = Path(__file__).resolve().parents[2]
REFERENCE_DIR = Path(os.environ.get("NAPARI_SAM_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
SHAPES = REFERENCE_DIR / "official_state_dict_shapes.json"


@pytest.fixture(scope="module")
def official_shapes():
    assert SHAPES.exists(), f"missing {SHAPES}"
    return json.loads(SHAPES.read_text())


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h", "vit_t"])
def test_keys_and_shapes_match_the_official_checkpoint(name, official_shapes):
    with torch.device("meta"):
        model = build_sam(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = official_shapes[name]
    assert sorted(set(theirs) - set(ours)) == []
    assert sorted(set(ours) - set(theirs)) == []
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h", "vit_t"])
def test_configuration_inferred_from_official_keys(name, official_shapes):
    fake = {k: torch.empty(v, device="meta") for k, v in official_shapes[name].items()}
    assert infer_config(fake) is CONFIGS[name]


def test_custom_vit_is_inferred():
    cfg = SamConfig(ViTConfig(embed_dim=48, depth=3, num_heads=3, global_attn_indexes=(2,)))
    with torch.device("meta"):
        sd = build_sam(cfg).state_dict()
    inferred = infer_config(sd)
    assert inferred.encoder == cfg.encoder and inferred.name == "custom"


def test_not_a_sam_state_dict():
    with pytest.raises(ValueError, match="not a SAM state dict"):
        infer_config({"backbone.weight": torch.zeros(3)})


def _tiny_state_dict():
    cfg = SamConfig(ViTConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)))
    return cfg, build_sam(cfg).state_dict()


def test_missing_and_foreign_keys_are_named():
    cfg, sd = _tiny_state_dict()
    del sd["mask_decoder.iou_token.weight"]
    sd["decoder_state.head.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError) as err:
        sam_from_state_dict(sd, cfg)
    msg = str(err.value)
    assert "1 missing key(s): mask_decoder.iou_token.weight" in msg
    assert "1 unexpected key(s): decoder_state.head.weight" in msg


def test_shape_mismatch_is_named():
    cfg, sd = _tiny_state_dict()
    sd["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 128)
    with pytest.raises(CheckpointError, match=r"no_mask_embed.weight: checkpoint \(1, 128\) vs model \(1, 256\)"):
        sam_from_state_dict(sd, cfg)


def test_loaded_model_is_usable_and_equal():
    cfg, sd = _tiny_state_dict()
    model = sam_from_state_dict(sd, cfg)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert not any(b.is_meta for b in model.buffers())
    with torch.inference_mode():
        emb = model.embed(torch.zeros(1, 3, 1024, 1024))
    assert emb.shape == (1, 256, 64, 64) and torch.isfinite(emb).all()


def test_bfloat16_encoder_runs_and_stays_close():
    cfg, sd = _tiny_state_dict()
    model = sam_from_state_dict(sd, cfg)
    x = torch.rand(1, 3, 1024, 1024) * 255
    with torch.inference_mode():
        ref = model.embed(x)
        model.image_encoder.to(torch.bfloat16)
        low = model.embed(x)
    assert low.dtype == torch.float32
    corr = torch.corrcoef(torch.stack([ref.flatten(), low.flatten()]))[0, 1]
    assert corr > 0.99
