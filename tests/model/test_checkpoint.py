"""Safe checkpoint reading: the layouts in circulation normalise to official keys, files
that need arbitrary unpickling are refused, and mismatches are reported by name."""

import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from napari_sam.model.checkpoint import (
    METADATA_KEY,
    Checkpoint,
    CheckpointError,
    UntrustedCheckpointError,
    check_state_dict,
    read_checkpoint,
    read_state_dict,
    write_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
REFERENCE_DIR = Path(os.environ.get("NAPARI_SAM_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
DEFAULT_REFERENCE_DIR = REPO.parent / "shared" / "reference"
# Any reference set will do (the seed only changes the values); without one, the tiny test SAM.
SMALL = next(iter(sorted(REFERENCE_DIR.glob("sam_small_seed*.pth"), key=lambda p: p.name != "sam_small_seed0.pth")),
             None)
SHAPES = next((d / "official_state_dict_shapes.json" for d in (REFERENCE_DIR, DEFAULT_REFERENCE_DIR)
               if (d / "official_state_dict_shapes.json").exists()), None)


def small_state():
    torch.manual_seed(0)
    return OrderedDict(
        [
            ("image_encoder.patch_embed.proj.weight", torch.randn(8, 3, 16, 16)),
            ("prompt_encoder.no_mask_embed.weight", torch.randn(1, 8)),
            ("mask_decoder.iou_token.weight", torch.randn(1, 8)),
        ]
    )


def save(obj, tmp_path, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def assert_same(a, b):
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


class Payload:
    """Unpickling this object creates a folder: the kind of side effect safe loading must prevent."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return os.mkdir, (self.target,)


# --- layouts ------------------------------------------------------------------------


def test_plain_official_state_dict(tmp_path):
    state = small_state()
    checkpoint = read_checkpoint(save(state, tmp_path))
    assert isinstance(checkpoint, Checkpoint)
    assert_same(checkpoint.state_dict, state)
    assert checkpoint.extras == {} and checkpoint.metadata == {}
    assert_same(read_state_dict(save(state, tmp_path)), state)


def test_micro_sam_training_checkpoint(tmp_path):
    state = small_state()
    decoder = {"base.conv.weight": torch.randn(4, 4), "out_conv.bias": torch.randn(3)}
    wrapped = {
        "model_state": OrderedDict(("sam." + k, v) for k, v in state.items()),
        "decoder_state": decoder,
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1, 2]}]},
        "epoch": 7,
        "best_metric": 0.25,
    }
    checkpoint = read_checkpoint(save(wrapped, tmp_path))
    assert_same(checkpoint.state_dict, state)
    assert set(checkpoint.extras) == {"decoder_state", "optimizer_state", "epoch", "best_metric"}
    assert_same(checkpoint.extras["decoder_state"], decoder)
    assert checkpoint.extras["epoch"] == 7


def test_micro_sam_exported_model_with_decoder(tmp_path):
    """BioImage.IO exports of micro-sam keep the SAM weights unprefixed beside the decoder."""
    state = small_state()
    checkpoint = read_checkpoint(save({"model_state": state, "decoder_state": {"w": torch.ones(2)}}, tmp_path))
    assert_same(checkpoint.state_dict, state)
    assert list(checkpoint.extras) == ["decoder_state"]


@pytest.mark.parametrize(
    "wrapper, prefix",
    [("model", "module."), ("state_dict", "model."), ("state_dict", "_orig_mod."), ("model_state", "module.sam.")],
)
def test_wrappers_and_prefixes(tmp_path, wrapper, prefix):
    state = small_state()
    obj = {wrapper: {prefix + k: v for k, v in state.items()}, "step": 3}
    checkpoint = read_checkpoint(save(obj, tmp_path))
    assert_same(checkpoint.state_dict, state)
    assert checkpoint.extras == {"step": 3}


def test_prefixed_plain_state_dict(tmp_path):
    state = small_state()
    assert_same(read_state_dict(save({"module." + k: v for k, v in state.items()}, tmp_path)), state)


def test_non_sam_keys_are_kept_for_the_mismatch_report(tmp_path):
    state = small_state()
    obj = {"model_state": {**{"sam." + k: v for k, v in state.items()}, "sam.extra_head.weight": torch.ones(1)}}
    got = read_state_dict(save(obj, tmp_path))
    assert "sam.extra_head.weight" in got  # unchanged, so check_state_dict names it as unexpected
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): sam.extra_head.weight"):
        check_state_dict(state, got)


def test_normalisation_buffers_go_to_extras(tmp_path):
    state = small_state()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    checkpoint = read_checkpoint(save({**state, "pixel_mean": mean}, tmp_path))
    assert_same(checkpoint.state_dict, state)
    assert torch.equal(checkpoint.extras["pixel_mean"], mean)


def test_keys_that_collide_after_normalisation_are_an_error(tmp_path):
    key = "mask_decoder.iou_token.weight"
    with pytest.raises(CheckpointError, match="both map to"):
        read_checkpoint(save({key: torch.ones(1), "module." + key: torch.zeros(1)}, tmp_path))


# --- our own checkpoints ------------------------------------------------------------


def test_write_and_read_back_with_metadata(tmp_path):
    state = small_state()
    metadata = {"config": "vit_b", "training": {"epochs": 3, "lr": 1e-5, "data": ["a.tif"]}, "base": None}
    path = tmp_path / "ours.pth"
    write_checkpoint(path, state, metadata)
    checkpoint = read_checkpoint(path)
    assert_same(checkpoint.state_dict, state)
    assert checkpoint.metadata == metadata
    assert checkpoint.extras == {}
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw[METADATA_KEY] == metadata
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.pth"]


def test_metadata_must_be_plain_json(tmp_path):
    with pytest.raises(CheckpointError, match="JSON"):
        write_checkpoint(tmp_path / "x.pth", small_state(), {"when": object()})
    assert not (tmp_path / "x.pth").exists()


def test_metadata_that_is_not_a_dict_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="must be a dict"):
        read_checkpoint(save({"state_dict": small_state(), METADATA_KEY: [1, 2]}, tmp_path))


# --- refused and unreadable files ---------------------------------------------------


def test_pickled_custom_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "unpickling-ran"
    path = save({"model_state": small_state(), "trainer": Payload(marker)}, tmp_path)
    assert not marker.exists()
    with pytest.raises(UntrustedCheckpointError, match="untrusted") as info:
        read_checkpoint(path)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, ValueError)
    assert str(path) in str(info.value) and "weights_only=False" in str(info.value)
    assert not marker.exists()


def test_whole_pickled_module_is_refused(tmp_path):
    with pytest.raises(UntrustedCheckpointError, match="torch.nn.modules.linear.Linear"):
        read_state_dict(save(torch.nn.Linear(2, 2), tmp_path))


@pytest.mark.parametrize("content", [b"", b"hello world" * 10])
def test_damaged_file_is_an_error(tmp_path, content):
    path = tmp_path / "damaged.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as info:
        read_checkpoint(path)
    assert not isinstance(info.value, UntrustedCheckpointError)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        read_checkpoint(tmp_path / "nowhere.pth")


@pytest.mark.parametrize(
    "obj, message",
    [
        ([torch.ones(1)], "holds a list"),
        ({"encoder.weight": torch.ones(1)}, "no SAM weights"),
        ({"epoch": 3, "lr": 0.1}, "no SAM state dict"),
        ({"model": {"image_encoder.x": torch.ones(1), "image_encoder.n": 3}}, "not tensors"),
    ],
)
def test_contents_without_sam_weights_are_an_error(tmp_path, obj, message):
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(save(obj, tmp_path))


# --- the real reference state dict --------------------------------------------------


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    """A full official-format SAM state dict: a reference set if there is one, else the tiny SAM."""
    if SMALL is not None:
        return SMALL
    from napari_sam.model import build_sam
    from tests.conftest import TINY

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("reference") / "tiny_sam.pth"
    torch.save(build_sam(TINY).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reference_state(reference_file):
    return torch.load(reference_file, map_location="cpu", weights_only=True)


def test_reference_state_dict_reads_unchanged(reference_file, reference_state):
    state = read_state_dict(reference_file)
    assert len(state) == len(reference_state) > 100
    assert {k.split(".", 1)[0] for k in state} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    assert_same(state, reference_state)


def test_reference_state_dict_wrapped_like_micro_sam(tmp_path, reference_state):
    wrapped = {"model_state": {"sam." + k: v for k, v in reference_state.items()}, "decoder_state": {}}
    checkpoint = read_checkpoint(save(wrapped, tmp_path))
    assert_same(checkpoint.state_dict, reference_state)
    assert checkpoint.extras == {"decoder_state": {}}


# --- checking against a model -------------------------------------------------------


def test_check_state_dict_accepts_an_exact_fit(reference_state):
    check_state_dict(reference_state, reference_state)  # tensors as the expected shapes
    check_state_dict({k: tuple(v.shape) for k, v in reference_state.items()}, reference_state)
    check_state_dict({k: v.shape for k, v in reference_state.items()}, reference_state)


def test_check_state_dict_names_missing_unexpected_and_misshapen_keys():
    expected = {"a.weight": (2, 3), "a.bias": (2,), "b.weight": (4,)}
    state = {"a.weight": torch.ones(3, 2), "a.bias": torch.ones(2), "c.weight": torch.ones(1)}
    with pytest.raises(CheckpointError) as info:
        check_state_dict(expected, state, what="the test model")
    text = str(info.value)
    assert "does not fit the test model" in text
    assert "1 missing key(s): b.weight" in text
    assert "1 unexpected key(s): c.weight" in text
    assert "1 shape mismatch(es): a.weight: checkpoint (3, 2) vs model (2, 3)" in text


def test_check_state_dict_lists_at_most_ten_of_each(reference_state):
    if SHAPES is None:
        pytest.skip(f"official_state_dict_shapes.json is in neither {REFERENCE_DIR} nor {DEFAULT_REFERENCE_DIR}")
    shapes = json.loads(SHAPES.read_text())["vit_b"]  # the real ViT-B layout vs the small encoder
    with pytest.raises(CheckpointError) as info:
        check_state_dict(shapes, reference_state)
    text = str(info.value)
    missing = [k for k in shapes if k not in reference_state]
    assert len(missing) > 10
    assert f"{len(missing)} missing key(s): " in text
    assert f"({len(missing) - 10} more)" in text
    assert missing[9] in text and missing[10] not in text
    ours = tuple(reference_state["image_encoder.pos_embed"].shape)  # (1, 64, 64, 64) for the seed-0 set
    assert f"shape mismatch(es): image_encoder.pos_embed: checkpoint {ours} vs model (1, 64, 64, 768)" in text


def test_metadata_is_stored_as_plain_json_types(tmp_path):
    """torch.__version__ is a str subclass: pickled as its class, a weights_only load
    would refuse the file (it did, once)."""
    import torch

    from napari_sam.model.checkpoint import read_checkpoint, write_checkpoint

    path = tmp_path / "m.pth"
    write_checkpoint(path, {"mask_decoder.w": torch.zeros(1)}, {"torch": torch.__version__, "n": (1, 2)},
                     extras={"decoder_state": {"x": torch.ones(2)}})
    checkpoint = read_checkpoint(path)
    assert type(checkpoint.metadata["torch"]) is str and checkpoint.metadata["n"] == [1, 2]
    assert torch.equal(checkpoint.extras["decoder_state"]["x"], torch.ones(2))
