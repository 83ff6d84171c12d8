"""Training an instance decoder on frozen embeddings: targets, loss, a run that learns,
resuming, and the result stored in a checkpoint that load_model reads back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam.model import SamConfig, ViTConfig, build_sam
from napari_sam.train import SegmentationDataset
from napari_sam.train.instance_decoder import (
    BEST,
    LAST,
    DecoderTrainingConfig,
    distance_dice_loss,
    iter_train_instance_decoder,
)
from napari_sam.train.instance_targets import contact_band, instance_targets
from tests.conftest import drain

SMALL = SamConfig(ViTConfig(embed_dim=16, depth=1, num_heads=1, global_attn_indexes=(0,), img_size=64), image_size=64,
                  name="decoder-test")


def discs(rng: np.random.Generator, side: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.indices((side, side))
    labels = np.zeros((side, side), np.int32)
    for i in range(1, int(rng.integers(2, 5)) + 1):
        cy, cx, r = rng.integers(8, side - 8), rng.integers(8, side - 8), rng.integers(4, 9)
        labels[(rows - cy) ** 2 + (cols - cx) ** 2 <= r * r] = i
    image = np.where(labels > 0, 200, 30).astype(np.uint8)
    return image, labels


@pytest.fixture(scope="module")
def small_sam():
    torch.manual_seed(0)
    return build_sam(SMALL).eval()


def dataset(seed: int, n: int) -> SegmentationDataset:
    pairs = [discs(np.random.default_rng([seed, i])) for i in range(n)]
    return SegmentationDataset.from_arrays([p[0] for p in pairs], [p[1] for p in pairs])


def test_targets_of_a_disc():
    labels = np.zeros((21, 21), np.int32)
    rows, cols = np.indices(labels.shape)
    labels[(rows - 10) ** 2 + (cols - 10) ** 2 <= 36] = 3
    fg, centre, boundary = instance_targets(labels)
    np.testing.assert_array_equal(fg, labels > 0)
    assert centre[10, 10] == 0 and boundary[10, 10] == 0  # the centre is also the deepest pixel
    inside = labels > 0
    assert centre[inside].max() == pytest.approx(1, abs=1e-6) and boundary[inside].max() == pytest.approx(1, abs=1e-6)
    assert (centre[~inside] == 1).all() and (boundary[~inside] == 1).all()
    # distances grow away from the centre along a row
    assert np.all(np.diff(centre[10, 10:17]) > 0)


def test_targets_refuse_non_integer_labels():
    with pytest.raises(ValueError, match="2D integer label image"):
        instance_targets(np.zeros((4, 4), np.float32))


def test_the_loss_is_zero_for_the_targets_and_counts_distances_inside_objects_only():
    _, labels = discs(np.random.default_rng(0))
    t = torch.from_numpy(instance_targets(labels))[None]
    assert float(distance_dice_loss(t, t)) == pytest.approx(0, abs=1e-6)
    wrong_outside = t.clone()
    wrong_outside[:, 1:][t[:, :1].expand(-1, 2, -1, -1) == 0] = 0.3
    assert float(distance_dice_loss(wrong_outside, t)) == pytest.approx(0, abs=1e-6)
    assert float(distance_dice_loss(1 - t, t)) > 1
    with pytest.raises(ValueError, match="must both be"):
        distance_dice_loss(t[:, :2], t[:, :2])


def test_the_contact_band_lies_where_objects_touch_and_nowhere_else():
    labels = np.zeros((40, 60), np.int32)
    labels[10:30, 5:20] = 1
    labels[10:30, 20:35] = 2  # drawn edge to edge with 1: they touch along column 19/20
    labels[10:30, 45:55] = 3  # alone, 10 pixels from 2
    band = contact_band(labels)
    assert band.shape == labels.shape and band.dtype == np.float32
    assert band[20, 19] == 1 and band[20, 20] == 1
    assert band[20, 19] > band[20, 16] > band[20, 12] > 0.0  # falling off away from the contact
    assert band[:, 40:].max() < 1e-6  # the lone object and its surroundings carry no weight
    assert band[0:3].max() < 0.02  # rows far above the pair (the contact reaches row 8)
    # a gap of two pixels still counts as touching, one of six does not
    gap = np.zeros((20, 30), np.int32)
    gap[5:15, 2:10], gap[5:15, 12:20] = 1, 2
    assert contact_band(gap)[10, 10:12].min() == 1
    far = np.zeros((20, 30), np.int32)
    far[5:15, 2:10], far[5:15, 16:24] = 1, 2
    assert not contact_band(far).any()
    assert not contact_band(np.zeros((8, 8), np.uint16)).any()
    with pytest.raises(ValueError, match="2D integer label image"):
        contact_band(np.zeros((4, 4), np.float32))


def test_pixel_weights_make_the_weighted_pixels_count():
    _, labels = discs(np.random.default_rng(0))
    t = torch.from_numpy(instance_targets(labels))[None]
    wrong = t.clone()
    wrong[..., :8, :] = 1 - wrong[..., :8, :]  # errors in the first rows only
    ones = torch.ones_like(t[:, :1])
    assert float(distance_dice_loss(wrong, t, weights=ones)) == pytest.approx(float(distance_dice_loss(wrong, t)))
    there = ones.clone()
    there[..., :8, :] = 10
    elsewhere = ones.clone()
    elsewhere[..., 8:, :] = 10
    assert float(distance_dice_loss(wrong, t, weights=there)) > float(distance_dice_loss(wrong, t))
    assert float(distance_dice_loss(wrong, t, weights=elsewhere)) < float(distance_dice_loss(wrong, t))
    assert float(distance_dice_loss(t, t, weights=there)) == pytest.approx(0, abs=1e-6)


def _config(**kw):
    base = dict(steps=40, batch_size=4, learning_rate=3e-3, warmup_steps=5, initial_features=4, scale=8,
                validate_every=20, seed=0)
    return DecoderTrainingConfig(**(base | kw))


def test_a_short_run_learns_and_keeps_the_best_decoder(small_sam, tmp_path):
    train, val = dataset(0, 12), dataset(1, 4)
    reports, decoder = drain(iter_train_instance_decoder(small_sam, train, val, _config(), tmp_path))
    embedded = [r for r in reports if r.stage == "embed"]
    assert [r.step for r in embedded] == [12, 16] and embedded[-1].steps == 16  # planes, in batches of 16
    reports = [r for r in reports if r.stage == "train"]
    assert [r.step for r in reports] == list(range(1, 41))
    losses = [r.validation_loss for r in reports if r.validation_loss is not None]
    assert len(losses) == 2 and losses[-1] < 1.5
    assert np.mean([r.loss for r in reports[-5:]]) < np.mean([r.loss for r in reports[:5]])
    assert not decoder.training and decoder.config.scale == 8 and decoder.config.initial_features == 4
    best = torch.load(tmp_path / BEST, weights_only=True)
    assert best["step"] == reports[-1].best_step
    assert all(torch.equal(decoder.state_dict()[k], v) for k, v in best["decoder"].items())
    # the frozen model is untouched
    assert not any(p.grad is not None for p in small_sam.parameters())


def check_resumes(run, model, config, other_config, last: str, folder) -> None:
    """A run of 6 steps (validating every 3) cut at step 4 resumes from its step-3
    checkpoint to the weights of the uninterrupted run; other settings are refused."""
    train, val = dataset(0, 8), dataset(1, 2)
    whole = drain(run(model, train, val, config, folder / "whole"))[1]
    gen = run(model, train, val, config, folder / "cut")
    for report in gen:
        if report.stage == "train" and report.step == 4:
            break
    gen.close()
    assert torch.load(folder / "cut" / last, weights_only=True)["step"] == 3
    reports, resumed = drain(run(model, train, val, config, folder / "cut"))
    assert [r.step for r in reports if r.stage == "train"] == [4, 5, 6]
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(ValueError, match="other settings"):
        drain(run(model, train, val, other_config, folder / "cut"))


def test_an_interrupted_run_resumes_where_it_stopped(small_sam, tmp_path):
    check_resumes(iter_train_instance_decoder, small_sam, _config(steps=6, validate_every=3),
                  _config(steps=7, validate_every=3), LAST, tmp_path)


def test_bad_settings_are_refused(small_sam):
    with pytest.raises(ValueError, match="steps must be at least 1"):
        DecoderTrainingConfig(steps=0)
    with pytest.raises(ValueError, match="training set is empty"):
        drain(iter_train_instance_decoder(small_sam, SegmentationDataset([], []), None, _config()))
