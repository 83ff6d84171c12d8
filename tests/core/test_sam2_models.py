"""Loading SAM 2.1 checkpoints: the official layout, the size inferred from the keys, the
reference sets' weights, and one clear line when a checkpoint of the other family is given.

Nothing here downloads: registry names resolve to local files or are refused before any
download; the largest file written is a randomised SAM 2.1 tiny (about 150 MB)."""

import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from napari_sam import weights
from napari_sam.core.models import load_model, model_choices, resolve_model, state_dict_family
from napari_sam.core.sam2_models import load_sam2_model
from napari_sam.model.sam2 import CONFIGS, Sam2, config_from_official
from napari_sam.model.sam2.sam2 import expected_shapes
from tests.model.sam2._sets import load_set, reference_sets

SETS = reference_sets()


def random_state(config, seed=0):
    """Random tensors with every key and shape of ``config``'s official state dict."""
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=generator) * 0.02 for k, shape in expected_shapes(config).items()}


def small_config():
    """A narrow two-stage variant of the tiny configuration: cheap to build, no released size."""
    tiny = CONFIGS["sam2.1_hiera_tiny"]
    trunk = replace(tiny.image_encoder.trunk, embed_dim=16, stages=(1, 1), global_att_blocks=(1,),
                    window_spec=(8, 4), q_pool=1)
    neck = replace(tiny.image_encoder.neck, backbone_channel_list=trunk.channel_list, fpn_top_down_levels=(0, 1))
    encoder = replace(tiny.image_encoder, trunk=trunk, neck=neck, scalp=0)
    return replace(tiny, name="small-test", image_encoder=encoder, image_size=256)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """A SAM 2.1 tiny checkpoint with random weights, in Meta's layout ``{"model": state_dict}``."""
    state = random_state("sam2.1_hiera_tiny")
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": state}, path)
    return path, state


@pytest.fixture()
def no_downloads(monkeypatch):
    def refuse(name, *args, **kwargs):
        raise AssertionError(f"{name} was fetched")

    monkeypatch.setattr(weights, "fetch_checkpoint", refuse)
    monkeypatch.setattr(weights, "fetch_decoder", refuse)


def test_an_official_tiny_checkpoint_loads_with_its_size_inferred(tiny_file):
    path, state = tiny_file
    model = load_sam2_model(path, device="cpu")
    assert isinstance(model, Sam2) and not model.training
    assert model.config == CONFIGS["sam2.1_hiera_tiny"]
    assert model.source.name == "sam2.1_hiera_tiny.pt" and model.source.path == str(path)
    assert model.source.dtype == "float32"
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in loaded.values())


def test_a_registry_name_loads_the_verified_cached_file(tiny_file, monkeypatch):
    path, state = tiny_file
    fetched = []
    monkeypatch.setattr(weights, "fetch_checkpoint", lambda name, *a, **k: fetched.append(name) or path)
    monkeypatch.setattr(weights, "fetch_decoder", lambda name, *a, **k: None)
    model = load_sam2_model("sam2.1_hiera_tiny", device="cpu")
    assert fetched == ["sam2.1_hiera_tiny"]
    assert model.source.name == "sam2.1_hiera_tiny" and model.config.name == "sam2.1_hiera_tiny"
    key = "image_encoder.trunk.patch_embed.proj.weight"
    assert torch.equal(model.state_dict()[key], state[key])


def test_a_bare_state_dict_and_a_given_configuration_load_too(tmp_path):
    config = small_config()
    state = random_state(config, seed=1)
    torch.save(state, tmp_path / "bare.pt")  # no {"model": ...} wrapper
    with pytest.raises(ValueError, match="fits none of the SAM 2.1 sizes"):
        load_sam2_model(tmp_path / "bare.pt", device="cpu")  # not a released size: inference refuses
    model = load_sam2_model(tmp_path / "bare.pt", device="cpu", config=config)
    assert model.config == config and model.image_size == 256
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_state_dict_that_does_not_fit_names_the_keys(tmp_path):
    state = random_state(small_config(), seed=2)
    del state["no_mem_embed"]
    state["sam_mask_decoder.extra.weight"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="missing key.*no_mem_embed.*unexpected key.*sam_mask_decoder.extra.weight"):
        load_sam2_model(tmp_path / "broken.pt", device="cpu", config=small_config())


def test_sam2_checkpoints_are_refused_by_load_model_in_one_line(tiny_file, no_downloads, tmp_path):
    path, _ = tiny_file
    with pytest.raises(ValueError) as info:
        load_model(path, device="cpu", dtype="float32")
    text = str(info.value)
    assert text.startswith(f"{path} is a SAM 2.1 checkpoint; it is used for propagation")
    assert "load_sam2_model" in text and "\n" not in text
    with pytest.raises(ValueError, match=r"^'sam2.1_hiera_large' is a SAM 2.1 checkpoint; it is used for propagation"):
        load_model("sam2.1_hiera_large")  # refused before 900 MB are downloaded
    with pytest.raises(ValueError, match="'sam2.1_hiera_small' is a SAM 2.1 checkpoint"):
        resolve_model("sam2.1_hiera_small")


def test_sam_checkpoints_are_refused_by_load_sam2_model_in_one_line(tiny_checkpoint, no_downloads):
    with pytest.raises(ValueError) as info:
        load_sam2_model(tiny_checkpoint)
    text = str(info.value)
    assert text.startswith(f"{tiny_checkpoint} is a SAM (1) checkpoint, not a SAM 2.1 one")
    assert "load_model" in text and "\n" not in text
    with pytest.raises(ValueError, match=r"^'vit_b_lm' is a SAM \(1\) checkpoint"):
        load_sam2_model("vit_b_lm")
    with pytest.raises(ValueError, match=r"'default' \(the model shipped with the package\) is a SAM \(1\)"):
        load_sam2_model("default")


def test_unknown_names_list_the_models_of_the_family_asked_for(tmp_path):
    with pytest.raises(ValueError, match="Known model names: sam2.1_hiera_base_plus, sam2.1_hiera_large, "
                                         "sam2.1_hiera_small, sam2.1_hiera_tiny$"):
        load_sam2_model("sam2.1_hiera_huge")
    with pytest.raises(ValueError, match="Known model names: default, vit_b, ") as info:
        load_model("sam2.1_hiera_huge")
    sam, sam2 = str(info.value).split("Known model names:")[1].split("(SAM 2.1, to propagate: ")
    assert "sam2.1" not in sam and sam2 == "sam2.1_hiera_base_plus, sam2.1_hiera_large, sam2.1_hiera_small, " \
        "sam2.1_hiera_tiny)"


def test_files_that_are_not_checkpoints_are_refused(tmp_path):
    (tmp_path / "noise.pt").write_bytes(b"\x00\x01" * 300)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_sam2_model(tmp_path / "noise.pt")
    with open(tmp_path / "object.pt", "wb") as fh:
        pickle.dump({"model": {"x": Path("/")}}, fh, protocol=2)  # a pickled class: never unpickled
    with pytest.raises(ValueError, match="refused to load"):
        load_sam2_model(tmp_path / "object.pt")
    with pytest.raises(ValueError, match="neither a model name nor an existing checkpoint file"):
        load_sam2_model(tmp_path / "missing.pt")


def test_the_family_of_a_state_dict(tiny_sam):
    assert state_dict_family(tiny_sam.state_dict()) == "sam"
    assert state_dict_family(expected_shapes("sam2.1_hiera_tiny")) == "sam2"


def test_the_sam_picker_offers_no_sam2_models():
    choices = model_choices()
    assert "vit_b" in choices and not [c for c in choices if c.startswith("sam2")]


@pytest.mark.parametrize("folder", SETS, ids=[p.name for p in SETS])
def test_reference_set_weights_load_exactly(folder):
    node, official, _, _ = load_set(folder)
    with pytest.raises(ValueError, match=r"fits none of the SAM 2.1 sizes .*; record its configuration in the "
                                        r"checkpoint's metadata"):
        load_sam2_model(folder / "weights.pth", device="cpu")  # a small randomised model: not a released size
    config = config_from_official(node, name=folder.name)
    model = load_sam2_model(folder / "weights.pth", device="cpu", config=config)
    assert model.config == config and model.source.path == str(folder / "weights.pth")
    loaded = model.state_dict()
    assert set(loaded) == set(official)
    assert all(torch.equal(loaded[k], v.float()) for k, v in official.items())


def test_the_committed_reference_set_is_found():
    assert "sam2_small_seed0" in [p.name for p in SETS]
