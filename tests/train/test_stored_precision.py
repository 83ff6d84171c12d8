"""Weights a run leaves as they were keep the precision their file stored them in: a
decoder fine-tune or a new instance decoder on the default model (float16 matrices) must
not write twice the file for the same values."""

import copy
import shutil

import numpy as np
import torch

from napari_sam.core.models import load_model
from napari_sam.model.checkpoint import read_checkpoint, write_checkpoint
from napari_sam.model.instance_decoder import InstanceDecoder, InstanceDecoderConfig
from napari_sam.train import SegmentationDataset, Trainer, TrainingConfig, save_with_instance_decoder


def _half_file(tiny_sam, path):
    """The tiny SAM stored as the default model is: matrices in float16, the rest float32."""
    state = {k: v.half() if v.numel() >= 1024 else v for k, v in tiny_sam.state_dict().items()}
    write_checkpoint(path, state, {})
    return {k for k, v in state.items() if v.dtype == torch.float16}


def _data(nuclei_2d):
    image, labels = nuclei_2d
    return SegmentationDataset.from_arrays([image[208:272, 64:112]], [labels[208:272, 64:112]])


def test_a_new_instance_decoder_leaves_the_sam_in_its_files_precision(tiny_sam, tmp_path):
    halves = _half_file(tiny_sam, tmp_path / "half.pth")
    model = load_model(tmp_path / "half.pth", device="cpu", dtype="float32")
    torch.manual_seed(0)
    decoder = InstanceDecoder(InstanceDecoderConfig(initial_features=4, scale=4, transposed=True)).eval()
    save_with_instance_decoder(model, decoder, tmp_path / "with_decoder.pth")
    written = read_checkpoint(tmp_path / "with_decoder.pth")
    assert halves and {k for k, v in written.state_dict.items() if v.dtype == torch.float16} == halves
    assert all(v.dtype == torch.float32 for v in written.extras["decoder_state"].values() if v.is_floating_point())
    again = load_model(tmp_path / "with_decoder.pth", device="cpu", dtype="float32")
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    for key, value in decoder.state_dict().items():
        assert torch.equal(again.instance_decoder.state_dict()[key], value), key
    assert (tmp_path / "with_decoder.pth").stat().st_size < 0.8 * _float32_size(model)


def _float32_size(model):
    return sum(v.numel() * 4 for v in model.state_dict().values())


def test_a_decoder_fine_tune_keeps_the_frozen_encoder_in_float16_and_what_it_learned_in_float32(
        tiny_sam, nuclei_2d, tmp_path):
    halves = _half_file(tiny_sam, tmp_path / "half.pth")
    model = load_model(tmp_path / "half.pth", device="cpu", dtype="float32")
    config = TrainingConfig(mode="decoder", steps=2, warmup_steps=0, learning_rate=1e-2, objects_per_image=2,
                            corrective_iterations=0, min_object_pixels=10)
    trainer = Trainer(model, _data(nuclei_2d), config, device="cpu")
    for _ in range(2):
        trainer.train_step()
    trainer.save(tmp_path / "tuned.pth", optimizer=False)
    written = read_checkpoint(tmp_path / "tuned.pth").state_dict
    encoder = {k for k in halves if k.startswith("image_encoder.")}
    learned = {k for k in halves if k.startswith("mask_decoder.")}
    assert encoder and learned
    assert all(written[k].dtype == torch.float16 for k in encoder)
    changed = {k for k in learned if not torch.equal(tiny_sam.state_dict()[k].half().float(),
                                                     trainer.model.state_dict()[k].float())}
    assert changed and all(written[k].dtype == torch.float32 for k in changed)  # a fine-tune's steps, not rounded
    again = load_model(tmp_path / "tuned.pth", device="cpu", dtype="float32")
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value.float()), key


def test_a_model_file_replaced_since_loading_costs_only_the_size(tiny_sam, tmp_path):
    _half_file(tiny_sam, tmp_path / "half.pth")
    model = load_model(tmp_path / "half.pth", device="cpu", dtype="float32")
    other = copy.deepcopy(tiny_sam)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    _half_file(other, tmp_path / "replacement.pth")
    shutil.move(tmp_path / "replacement.pth", tmp_path / "half.pth")
    decoder = InstanceDecoder(InstanceDecoderConfig(initial_features=4, scale=4, transposed=True)).eval()
    save_with_instance_decoder(model, decoder, tmp_path / "out.pth")
    written = read_checkpoint(tmp_path / "out.pth").state_dict
    for key, value in model.state_dict().items():  # the loaded model's values, not the new file's
        np.testing.assert_array_equal(written[key].float().numpy(), value.numpy())
    (tmp_path / "half.pth").unlink()  # gone: float32 throughout, still the model's values
    save_with_instance_decoder(model, decoder, tmp_path / "out2.pth")
    written = read_checkpoint(tmp_path / "out2.pth").state_dict
    assert all(v.dtype == torch.float32 for v in written.values() if v.is_floating_point())
    assert all(torch.equal(written[k], v) for k, v in model.state_dict().items())
