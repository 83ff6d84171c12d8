"""micro-sam's instance decoder: parity with the original, strict and safe loading.

A reference set is a folder with ``decoder.pt``, ``data.pt`` and ``meta.json``, made by
``scripts/make_instance_decoder_reference.py`` with the original micro-sam and torch-em
code. Every set under ``tests/reference/instance_decoder/`` and under
``$NAPARI_SAM_REFERENCE_DIR/instance_decoder/`` (default ``../shared/reference``) is tested.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from napari_sam.model.checkpoint import CheckpointError, UntrustedCheckpointError, read_checkpoint
from napari_sam.model.decoder_checkpoint import find_decoder_state, load_instance_decoder, read_decoder_state
from napari_sam.model.instance_decoder import (
    InstanceDecoder,
    InstanceDecoderConfig,
    infer_decoder_config,
    instance_decoder_from_state_dict,
)

REPO = Path(__file__).resolve().parents[2]
OWN_SETS = REPO / "tests" / "reference" / "instance_decoder"
REFERENCE_DIR = Path(os.environ.get("NAPARI_SAM_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
SHARED_SETS = REFERENCE_DIR / "instance_decoder"
SETS = sorted(p.parent for folder in (OWN_SETS, SHARED_SETS) for p in folder.glob("*/meta.json"))

# The tolerances of ../shared/reference/README.md for float32 results of two correct
# implementations (they differ by summation order).
TOL = dict(atol=5e-3, rtol=1e-3)


def _set_id(path: Path) -> str:
    return f"{'own' if path.parent == OWN_SETS else 'shared'}/{path.name}"


@pytest.fixture(scope="module", params=SETS, ids=[_set_id(p) for p in SETS])
def reference(request):
    folder = request.param
    meta = json.loads((folder / "meta.json").read_text())
    data = torch.load(folder / "data.pt", map_location="cpu", weights_only=True)
    return folder, meta, data, load_instance_decoder(folder / "decoder.pt")


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """The decoder state of the first committed set: small, and every key micro-sam writes."""
    return torch.load(OWN_SETS / "seed0" / "decoder.pt", map_location="cpu", weights_only=True)


def test_both_committed_sets_are_found():
    names = {p.name for p in SETS if p.parent == OWN_SETS}
    assert {"seed0", "seed1"} <= names, f"reference sets missing from {OWN_SETS}"


# --- parity with the original ------------------------------------------------------


def test_configuration_is_inferred_from_the_weights(reference):
    _, meta, _, decoder = reference
    assert decoder.config == InstanceDecoderConfig(
        embed_dim=meta["embed_dim"], initial_features=meta["initial_features"], out_channels=3,
        transposed=meta["transposed"],
    )
    assert not decoder.training


def test_every_case_matches_the_original(reference):
    _, meta, data, decoder = reference
    embedding = data["embedding"].float()
    for case in meta["cases"]:
        index = data[f"{case}/index"].tolist()
        expected = data[f"{case}/output"]
        with torch.no_grad():
            got = decoder(embedding[index], data[f"{case}/input_size"].tolist(),
                          data[f"{case}/original_size"].tolist(), image_size=meta["image_size"])
        assert got.shape == expected.shape, case
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m, c=case: f"{c}: {m}")


def test_maps_of_a_batch_resized_one_by_one_match_the_original(reference):
    """micro-sam's tiled path decodes a batch of tiles, then resizes each tile on its own."""
    _, meta, data, decoder = reference
    with torch.no_grad():
        maps = decoder.maps(data["embedding"].float())
    assert maps.shape[1:] == (3, meta["image_size"], meta["image_size"])
    assert 0 <= float(maps.min()) and float(maps.max()) <= 1
    for case in meta["cases"]:
        for row, i in enumerate(data[f"{case}/index"].tolist()):
            got = InstanceDecoder.resize(maps[i:i + 1], data[f"{case}/input_size"].tolist(),
                                         data[f"{case}/original_size"].tolist())
            torch.testing.assert_close(got[0], data[f"{case}/output"][row], **TOL)


# --- strict loading ----------------------------------------------------------------


def test_the_committed_state_loads_strictly(state):
    decoder = instance_decoder_from_state_dict(state)
    assert set(decoder.state_dict()) == set(state)
    assert all(torch.equal(decoder.state_dict()[k], v) for k, v in state.items())


def test_transposed_upsampling_is_told_by_the_keys(state):
    assert not infer_decoder_config(state).transposed
    transposed = torch.load(OWN_SETS / "seed1" / "decoder.pt", weights_only=True)
    assert infer_decoder_config(transposed).transposed
    assert "decoder.samplers.0.block.weight" in InstanceDecoder(InstanceDecoderConfig(transposed=True)).state_dict()


def test_a_missing_key_is_named(state):
    broken = {k: v for k, v in state.items() if k != "deconv2.block.2.running_var"}
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): deconv2\.block\.2\.running_var"):
        instance_decoder_from_state_dict(broken)


def test_a_missing_configuration_key_is_named(state):
    broken = {k: v for k, v in state.items() if k != "out_conv.weight"}
    with pytest.raises(CheckpointError, match="missing key out_conv.weight"):
        instance_decoder_from_state_dict(broken)


def test_an_extra_key_is_named(state):
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): encoder\.neck\.0\.weight"):
        instance_decoder_from_state_dict({**state, "encoder.neck.0.weight": torch.zeros(256, 16, 1, 1)})


def test_a_wrong_shape_is_named(state):
    broken = dict(state)
    broken["decoder.blocks.1.block.4.weight"] = torch.zeros(8, 8, 1, 1)
    with pytest.raises(CheckpointError, match=r"decoder\.blocks\.1\.block\.4\.weight: checkpoint \(8, 8, 1, 1\)"):
        instance_decoder_from_state_dict(broken)


def test_mixed_upsampling_is_refused_with_the_keys_named(state):
    broken = {k: v for k, v in state.items() if not k.startswith("deconv_out.")}
    broken["deconv_out.block.weight"] = torch.zeros(4, 4, 2, 2)
    broken["deconv_out.block.bias"] = torch.zeros(4)
    with pytest.raises(CheckpointError, match="deconv_out.conv.weight") as info:
        instance_decoder_from_state_dict(broken)
    assert "deconv_out.block.weight" in str(info.value)


# --- reading files -----------------------------------------------------------------


class Payload:
    """Unpickling this object creates a folder: the side effect safe loading must prevent."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_micro_sam_combined_checkpoint(tmp_path, tiny_sam, state):
    """micro-sam's exported models: SAM under model_state, the decoder beside it."""
    path = tmp_path / "vit_x_lm.pt"
    torch.save({"model_state": tiny_sam.state_dict(), "decoder_state": state}, path)
    decoder = load_instance_decoder(path)
    assert all(torch.equal(decoder.state_dict()[k], v) for k, v in state.items())
    # the SAM reader keeps the decoder apart, and it is found there too
    assert set(find_decoder_state(read_checkpoint(path).extras)) == set(state)


def test_training_checkpoint_with_optimizer_state(tmp_path, state):
    path = tmp_path / "best.pt"
    torch.save({"model_state": {"sam.image_encoder.x": torch.zeros(1)}, "decoder_state": state,
                "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-5}]}, "epoch": 3}, path)
    assert set(read_decoder_state(path)) == set(state)


def test_a_checkpoint_without_a_decoder_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(CheckpointError) as info:
        load_instance_decoder(tiny_checkpoint)
    assert str(info.value) == f"{tiny_checkpoint} has no instance decoder (decoder_state)"
    assert isinstance(info.value, ValueError)


def test_entries_that_are_not_tensors_are_named(tmp_path, state):
    path = tmp_path / "odd.pt"
    torch.save({"decoder_state": {**state, "note": "trained on cells"}}, path)
    with pytest.raises(CheckpointError, match=r"1 decoder_state entries are not tensors: note"):
        read_decoder_state(path)


def test_a_pickled_object_is_refused_without_running_it(tmp_path, state):
    marker = tmp_path / "unpickling-ran"
    path = tmp_path / "trainer.pt"
    torch.save({"decoder_state": state, "trainer": Payload(marker)}, path)
    with pytest.raises(UntrustedCheckpointError, match="untrusted"):
        read_decoder_state(path)
    assert not marker.exists()


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        read_decoder_state(tmp_path / "nowhere.pt")


# --- bad input ---------------------------------------------------------------------


def test_an_embedding_of_the_wrong_width_is_refused(state):
    decoder = instance_decoder_from_state_dict(state)
    with pytest.raises(ValueError, match=r"\(B, 256, h, w\) image embeddings, not a tensor of shape \(1, 64, 4, 4\)"):
        decoder(torch.zeros(1, 64, 4, 4), (64, 64), (64, 64))


@pytest.mark.parametrize("input_size, original_size", [((65, 64), (10, 10)), ((0, 64), (10, 10)), ((64, 64), (0, 5))])
def test_sizes_outside_the_model_input_are_refused(input_size, original_size):
    with pytest.raises(ValueError, match="input_size"):
        InstanceDecoder.resize(torch.zeros(1, 3, 64, 64), input_size, original_size)


def test_the_default_configuration_is_micro_sams():
    config = InstanceDecoderConfig()
    assert config.features == (512, 256, 128, 64) and config.embed_dim == 256 and config.out_channels == 3
    with pytest.raises(ValueError, match="initial_features"):
        InstanceDecoderConfig(initial_features=0)


@pytest.mark.parametrize("scale", [4, 8])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_coarser_decoder_round_trips_through_its_state_dict(scale, transposed):
    """Our coarser decoders (not micro-sam's) are told apart by their keys alone."""
    torch.manual_seed(0)
    config = InstanceDecoderConfig(initial_features=4, transposed=transposed, scale=scale)
    decoder = InstanceDecoder(config).eval()
    assert ("deconv3.block.0" in dict(decoder.named_modules())) == (scale == 8)
    assert not any(k.startswith(("deconv4.", "deconv_out.")) for k in decoder.state_dict())
    loaded = instance_decoder_from_state_dict(decoder.state_dict())
    assert loaded.config == config
    x = torch.randn(2, 256, 3, 5)
    maps = loaded.maps(x)
    # the model-input frame at 16 pixels per token, whatever the decoder's own resolution
    assert maps.shape == (2, 3, 48, 80) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    torch.testing.assert_close(maps, decoder.maps(x), rtol=0, atol=0)


def test_an_unknown_scale_is_refused():
    with pytest.raises(ValueError, match="scale must be 4, 8 or 16"):
        InstanceDecoderConfig(scale=2)


def test_load_model_attaches_a_decoder_kept_out_of_the_sam_weights(tmp_path, tiny_sam):
    from napari_sam.core.models import load_model
    from napari_sam.model.checkpoint import write_checkpoint

    torch.manual_seed(1)
    decoder = InstanceDecoder(InstanceDecoderConfig(initial_features=4, scale=4, transposed=True))
    path = tmp_path / "with_decoder.pth"
    write_checkpoint(path, tiny_sam.state_dict(), {"note": "x"}, extras={"decoder_state": decoder.state_dict()})
    model = load_model(path, device="cpu", dtype="float32")
    assert model.instance_decoder is not None and not model.instance_decoder.training
    assert model.instance_decoder.config.scale == 4
    assert not any(k.startswith("instance") for k in model.state_dict())
    x = torch.randn(1, 256, 4, 4)
    torch.testing.assert_close(model.instance_decoder.maps(x), decoder.eval().maps(x), rtol=0, atol=0)
    model.instance_decoder = None
    assert model.instance_decoder is None
    # a checkpoint without one loads without one
    plain = tmp_path / "plain.pth"
    write_checkpoint(plain, tiny_sam.state_dict())
    assert load_model(plain, device="cpu", dtype="float32").instance_decoder is None


def test_a_decoder_that_does_not_fit_fails_the_model_load(tmp_path, tiny_sam):
    from napari_sam.core.models import load_model
    from napari_sam.model.checkpoint import write_checkpoint

    state = InstanceDecoder(InstanceDecoderConfig(initial_features=4)).state_dict()
    state.pop("out_conv.bias")
    path = tmp_path / "broken.pth"
    write_checkpoint(path, tiny_sam.state_dict(), extras={"decoder_state": state})
    with pytest.raises(CheckpointError, match="out_conv.bias"):
        load_model(path, device="cpu", dtype="float32")


def test_a_registry_model_brings_its_separate_decoder_file(tmp_path, tiny_checkpoint, monkeypatch):
    """micro-sam's registry keeps vit_b_lm's decoder in a file of its own; both are fetched."""
    from napari_sam import weights
    from napari_sam.core.models import load_model

    torch.manual_seed(2)
    decoder = InstanceDecoder(InstanceDecoderConfig(initial_features=4))
    decoder_file = tmp_path / "vit_t_lm_decoder.pt"
    torch.save(decoder.state_dict(), decoder_file)
    asked = []
    monkeypatch.setattr(weights, "fetch_checkpoint", lambda name, *a, **k: asked.append(name) or tiny_checkpoint)
    monkeypatch.setattr(weights, "fetch_decoder", lambda name, *a, **k: asked.append(name) or decoder_file)
    model = load_model("vit_t_lm", device="cpu", dtype="float32")
    assert asked == ["vit_t_lm", "vit_t_lm"]
    x = torch.randn(1, 256, 2, 2)
    torch.testing.assert_close(model.instance_decoder.maps(x), decoder.eval().maps(x), rtol=0, atol=0)
    # a model without a decoder file gets none
    monkeypatch.setattr(weights, "fetch_decoder", lambda name, *a, **k: None)
    assert load_model("vit_t_lm", device="cpu", dtype="float32").instance_decoder is None
