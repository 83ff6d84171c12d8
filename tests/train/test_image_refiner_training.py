"""Training an image refiner on a frozen model and decoder: a run that learns on crops,
leaves the decoder's own weights alone, resumes, and is stored in a checkpoint that
load_model reads back with the refiner in use."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from napari_sam.model import build_sam
from napari_sam.model.instance_decoder import InstanceDecoder, InstanceDecoderConfig
from napari_sam.train import SegmentationDataset, save_with_instance_decoder
from napari_sam.train.image_refiner import LAST, RefinerTrainingConfig, _frame_labels, iter_train_image_refiner
from tests.conftest import drain
from tests.train.test_instance_decoder_training import SMALL, check_resumes, dataset


@pytest.fixture(scope="module")
def sam_with_decoder():
    torch.manual_seed(0)
    sam = build_sam(SMALL).eval()
    sam.instance_decoder = InstanceDecoder(InstanceDecoderConfig(initial_features=4, scale=4, transposed=True)).eval()
    return sam


def _config(**kw):
    return RefinerTrainingConfig(**(dict(steps=30, batch_size=4, crop=32, width=4, learning_rate=1e-2,
                                         warmup_steps=3, validate_every=15, seed=0) | kw))


def test_labels_reach_the_model_frame_by_nearest_neighbour():
    labels = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(_frame_labels(labels, (6, 8)), np.repeat(np.repeat(labels, 2, 0), 2, 1))
    np.testing.assert_array_equal(_frame_labels(labels, (3, 4)), labels)


def test_a_short_run_learns_and_leaves_the_decoder_alone(sam_with_decoder, tmp_path):
    before = {k: v.clone() for k, v in sam_with_decoder.instance_decoder.state_dict().items()}
    train, val = dataset(0, 8), dataset(1, 3)
    reports, decoder = drain(iter_train_image_refiner(sam_with_decoder, train, val, _config(), tmp_path))
    steps = [r for r in reports if r.stage == "train"]
    assert [r.step for r in steps] == list(range(1, 31))
    assert len([r for r in steps if r.validation_loss is not None]) == 2
    assert np.mean([r.loss for r in steps[-5:]]) < np.mean([r.loss for r in steps[:5]])
    assert decoder.needs_image and decoder.config.refine_width == 4 and not decoder.training
    for k, v in before.items():  # the decoder it refines keeps its weights, in the copy and the model
        torch.testing.assert_close(decoder.state_dict()[k], v, rtol=0, atol=0)
        torch.testing.assert_close(sam_with_decoder.instance_decoder.state_dict()[k], v, rtol=0, atol=0)
    assert not sam_with_decoder.instance_decoder.needs_image
    assert any(v.abs().sum() > 0 for k, v in decoder.state_dict().items() if k.startswith("refine.body.8"))


def test_the_contact_weight_changes_what_a_run_minimises(sam_with_decoder):
    train = dataset(0, 8)
    plain = [r.loss for r in drain(iter_train_image_refiner(sam_with_decoder, train, None, _config(steps=3)))[0]
             if r.stage == "train"]
    weighted = [r.loss for r in drain(iter_train_image_refiner(sam_with_decoder, train, None,
                                                               _config(steps=3, contact_weight=10)))[0]
                if r.stage == "train"]
    # same crops and the same starting refiner: only the contact pixels' weight differs
    assert len(plain) == len(weighted) == 3 and all(np.isfinite(weighted))
    assert abs(weighted[0] - plain[0]) > 1e-4


def test_an_interrupted_run_resumes_where_it_stopped(sam_with_decoder, tmp_path):
    check_resumes(iter_train_image_refiner, sam_with_decoder, _config(steps=6, validate_every=3),
                  _config(steps=7, validate_every=3), LAST, tmp_path)


def test_the_refined_decoder_is_stored_and_used_after_loading(tiny_model, tmp_path):
    from napari_sam.auto.instance_maps import iter_instance_maps
    from napari_sam.core.embeddings import Embeddings
    from napari_sam.core.models import load_model

    sam = copy.deepcopy(tiny_model)
    torch.manual_seed(1)
    sam.instance_decoder = InstanceDecoder(InstanceDecoderConfig(initial_features=4, scale=4, transposed=True)).eval()
    _, decoder = drain(iter_train_image_refiner(sam, dataset(0, 2), None, _config(steps=3)))
    path = save_with_instance_decoder(sam, decoder, tmp_path / "refined.pth", {"note": "test"})
    loaded = load_model(path, device="cpu", dtype="float32")
    assert loaded.instance_decoder.needs_image and loaded.instance_decoder.config.refine_width == 4
    assert loaded.metadata["instance_decoder"] == {"note": "test"}
    image = dataset(2, 1)[0].image
    emb = Embeddings(image, loaded, cache=False)
    _, maps = drain(iter_instance_maps(emb, 0, loaded.instance_decoder))
    e = emb.embedding_for(0)
    with torch.no_grad():
        expected = decoder(e.features, e.input_size, e.original_size, 1024, image=emb.model_input(0))[0].numpy()
    np.testing.assert_allclose(maps, expected, atol=1e-5)


def test_bad_requests_are_refused(sam_with_decoder):
    with pytest.raises(ValueError, match="crop must be at least 1"):
        RefinerTrainingConfig(crop=0)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="contact_weight must be a number of at least 0"):
            RefinerTrainingConfig(contact_weight=bad)
    bare = build_sam(SMALL).eval()
    with pytest.raises(ValueError, match="has none yet"):
        drain(iter_train_image_refiner(bare, dataset(0, 2), None, _config()))
    with pytest.raises(ValueError, match="training set is empty"):
        drain(iter_train_image_refiner(sam_with_decoder, SegmentationDataset([], []), None, _config()))
