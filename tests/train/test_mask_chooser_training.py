"""Training the chooser among a lone click's masks: the samples are the model's own three
masks with their true IoUs in the model-input frame, training learns to pick the best one
where the IoU head does not, and the validation keeps the best step."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam.model.mask_chooser import WINDOW
from napari_sam.train.mask_chooser import (
    ChooserSamples,
    MaskChooserConfig,
    chooser_pick_iou,
    collect_chooser_samples,
    train_mask_chooser,
)


def _samples(n: int, seed: int) -> ChooserSamples:
    """Windows whose best mask is the one that covers the bright disc in the image; the IoU
    head's values say nothing (always the first)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:WINDOW, :WINDOW]
    windows, true = [], []
    for _ in range(n):
        best = int(rng.integers(3))
        disc = ((yy - 24) ** 2 + (xx - 24) ** 2 < 100).astype(np.float32)
        masks, ious = [], []
        for k in range(3):
            r = 10 if k == best else (5 if k < best else 16)
            m = (yy - 24) ** 2 + (xx - 24) ** 2 < r * r
            masks.append(np.where(m, 8.0, -8.0))
            ious.append((m & (disc > 0)).sum() / (m | (disc > 0)).sum())
        image = disc * 3 + rng.normal(0, 0.2, disc.shape)
        windows.append(np.stack([image, *masks]).astype(np.float16))
        true.append(ious)
    return ChooserSamples(np.stack(windows), np.tile([0.9, 0.8, 0.7], (n, 1)).astype(np.float32),
                          np.array(true, np.float32), np.full(n, 40.0, np.float32), np.zeros(n, int))


def test_training_learns_the_pick_the_iou_head_misses():
    train, validation = _samples(96, 0), _samples(48, 1)
    head = chooser_pick_iou(None, validation)
    logged = []
    chooser = train_mask_chooser(train, validation, MaskChooserConfig(width=8, steps=150, batch_size=32,
                                                                      validate_every=50), logged.append)
    picked = chooser_pick_iou(chooser, validation)
    best = float(validation.true.max(1).mean())
    assert head < 0.7 and picked > head + 0.2 and picked == pytest.approx(best, abs=0.05)
    assert [r["step"] for r in logged] == [50, 100, 150]
    # the weights kept are those of the validation step that picked best
    assert picked == pytest.approx(max(r["validation_pick_iou"] for r in logged), abs=1e-3)
    both = train + validation
    assert len(both) == 144 and both.windows.shape == (144, 4, WINDOW, WINDOW)


def test_the_samples_are_the_models_three_masks_with_their_true_ious(tiny_model):
    labels = np.zeros((100, 140), np.uint16)
    labels[20:40, 30:60] = 1
    labels[60:90, 90:110] = 2
    labels[5:7, 5:7] = 3  # too small to be sampled
    image = np.where(labels > 0, 200, 30).astype(np.uint8)
    samples = collect_chooser_samples(tiny_model, [(image, labels)], clicks=3, seed=0)
    assert len(samples) == 6  # two objects, three clicks each
    assert samples.windows.shape == (6, 4, WINDOW, WINDOW) and samples.windows.dtype == np.float16
    assert samples.predicted.shape == samples.true.shape == (6, 3)
    assert ((samples.true >= 0) & (samples.true <= 1)).all() and (samples.side >= 16).all()
    # the first click of each object is its deepest pixel: the same click answered twice
    again = collect_chooser_samples(tiny_model, [(image, labels)], clicks=1, seed=5)
    np.testing.assert_array_equal(again.true, samples.true[[0, 3]])
    np.testing.assert_array_equal(again.windows, samples.windows[[0, 3]])
