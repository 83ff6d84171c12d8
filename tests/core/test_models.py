import pytest
import torch

from napari_sam.core.models import load_model, resolve_dtype


def test_load_local_checkpoint(tiny_checkpoint, tiny_sam):
    model = load_model(tiny_checkpoint, device="cpu", dtype="float32")
    assert model.source.name == tiny_checkpoint.name
    assert model.source.checksum.startswith("sha256:") and len(model.source.checksum) == 71
    for k, v in tiny_sam.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_bfloat16_encoder_and_float32_decoder(tiny_checkpoint, recwarn):
    model = load_model(tiny_checkpoint, device="cpu", dtype="bfloat16")
    assert model.encoder_dtype == torch.bfloat16
    assert model.mask_decoder.iou_token.weight.dtype == torch.float32
    assert model.source.dtype == "bfloat16"


def test_auto_dtype_is_float32_without_native_bfloat16(monkeypatch):
    import napari_sam.core.models as models

    monkeypatch.setattr(models, "native_bfloat16", lambda device: False)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(models, "native_bfloat16", lambda device: True)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("bad", ["float64", "int8"])
def test_bad_dtype(bad, tiny_checkpoint):
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(tiny_checkpoint, dtype=bad)


def test_float16_refused_on_cpu(tiny_checkpoint):
    with pytest.raises(ValueError, match="float16 is for GPUs"):
        load_model(tiny_checkpoint, device="cpu", dtype="float16")


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="neither a model name nor an existing checkpoint file"):
        load_model(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="not a checkpoint file"):
        load_model(tmp_path)


def test_unavailable_device(tiny_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        load_model(tiny_checkpoint, device="cuda")


def test_resolve_model_passes_a_loaded_model_and_loads_names(tiny_model, tiny_checkpoint, monkeypatch):
    from napari_sam.core import models

    assert models.resolve_model(tiny_model) is tiny_model
    monkeypatch.setenv(models.MODEL_ENV_VAR, str(tiny_checkpoint))
    assert models.default_model_spec() == str(tiny_checkpoint)
    loaded = models.resolve_model(None, device="cpu", dtype="float32")
    assert loaded.source.path == str(tiny_checkpoint) and loaded.metadata == {}
    assert models.model_choices()[0] == str(tiny_checkpoint)  # a file named by the variable comes first
    monkeypatch.delenv(models.MODEL_ENV_VAR)
    monkeypatch.setattr(models, "DEFAULT_CHECKPOINT", tiny_checkpoint.parent / "missing.pth")
    assert models.default_model_spec() is None and models.DEFAULT_MODEL not in models.model_choices()
    with pytest.raises(ValueError, match="no model given"):
        models.resolve_model(None)


def test_a_model_built_in_memory_declares_no_source(tiny_sam):
    assert tiny_sam.source is None and tiny_sam.metadata == {}


def test_a_models_weights_alone_load_at_the_input_size_their_shapes_give(tmp_path):
    from napari_sam.core.models import DEFAULT_CHECKPOINT
    from napari_sam.model.checkpoint import read_checkpoint

    # "just the weights", as people export a model: no metadata saying its input is 256 pixels
    torch.save({"state_dict": read_checkpoint(DEFAULT_CHECKPOINT).state_dict}, tmp_path / "weights.pth")
    model = load_model(tmp_path / "weights.pth", dtype="float32")
    assert model.config.image_size == model.config.encoder.img_size == 256
    with torch.no_grad():
        features = model.image_encoder(torch.zeros(1, 3, 256, 256))
    assert tuple(features.shape) == (1, 256, 16, 16) and model.config.embedding_size == 16


def test_a_model_that_is_not_one_is_named(tiny_model):
    from napari_sam.core.sam2_models import split_models

    with pytest.raises(TypeError, match="a registry name or a checkpoint path, not int 5"):
        split_models(5)


def test_a_checkpoint_replaced_after_loading_never_signs_the_old_weights_caches(tmp_path, tiny_checkpoint, tiny_sam):
    import numpy as np

    from napari_sam.core.distributed import _worker_predictor
    from napari_sam.core.embeddings import Embeddings
    from napari_sam.core.preprocess import Normalization

    path = tmp_path / "model.pth"
    path.write_bytes(tiny_checkpoint.read_bytes())
    old = load_model(path, device="cpu", dtype="float32")
    newer = {k: v + 1 if v.is_floating_point() else v for k, v in tiny_sam.state_dict().items()}
    torch.save(newer, path)  # `napari-sam train --out model.pth` finishing, or a copy of a newer version
    with pytest.raises(ValueError, match="changed on disk since the model was loaded"):
        Embeddings(np.zeros((64, 64), np.uint8), old, tmp_path / "c.zarr").embedding_for(0, (0, 0))
    assert not (tmp_path / "c.zarr").exists()
    fresh = load_model(path, device="cpu", dtype="float32")  # loaded again: signs with the new file's hash
    assert fresh.source.checksum.startswith("sha256:")
    # a dask worker whose file at that path is not the client's refuses to embed
    with pytest.raises(ValueError, match="is not the client's"):
        _worker_predictor(str(path), "sha256:" + "0" * 64, "float32", Normalization(), 1)
