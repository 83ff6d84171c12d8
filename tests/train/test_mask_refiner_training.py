"""Training the prompted masks' refiner: the samples are the model's own answers in the
model-input frame, training moves the masks towards the objects, a run resumes from its
checkpoint and refuses another configuration's, and the head travels in the checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from napari_sam.model.mask_refiner import MASK_REFINER_KEY
from napari_sam.train.mask_refiner import (
    KINDS,
    MaskRefinerConfig,
    MaskSamples,
    collect_mask_samples,
    mask_refiner_iou,
    save_with_mask_refiner,
    train_mask_refiner,
)


def _disks(n: int = 12, side: int = 64, seed: int = 0) -> MaskSamples:
    """Bright disks whose 'SAM' logits are a disk 4 pixels too small, coarsely: a head that
    reads the image can learn to grow them to the edge."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    images, lows, targets = [], [], []
    for _ in range(n):
        cy, cx, r = rng.uniform(22, 42), rng.uniform(22, 42), rng.uniform(9, 14)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        small = ((yy - cy) ** 2 + (xx - cx) ** 2 < (r - 4) ** 2).astype(np.float32)
        low = F.avg_pool2d(torch.from_numpy(small)[None, None], 4)[0, 0].numpy() * 16 - 8
        images.append((disk * 2.0 - 1 + rng.normal(0, 0.1, disk.shape)).astype(np.float16))
        lows.append(low.astype(np.float16))
        targets.append(disk)
    return MaskSamples(np.stack(images), np.arange(n), np.zeros(n, int), np.stack(lows), np.stack(targets))


CONFIG = MaskRefinerConfig(width=8, depth=3, steps=200, batch_size=8, window=48, jitter=4, learning_rate=5e-3)


def test_training_grows_the_masks_to_the_objects():
    samples = _disks()
    before = mask_refiner_iou(None, samples)["point"]
    refiner = train_mask_refiner(samples, CONFIG)
    after = mask_refiner_iou(refiner, samples)["point"]
    held = _disks(6, seed=1)
    assert before < 0.6
    assert after > before + 0.15
    assert mask_refiner_iou(refiner, held)["point"] > mask_refiner_iou(None, held)["point"] + 0.1


def test_degraded_windows_lower_contrast_or_add_noise():
    # --noise: a window's pixels are made worse (contrast 0.3-1x, Gaussian noise up to
    # `noise` standard deviations), each in half of the windows
    from napari_sam.train.mask_refiner import _degraded

    image = torch.from_numpy(_disks(1).images[0, 8:56, 8:56].astype(np.float32))
    rng = np.random.default_rng(0)
    untouched, lowered, noisy = 0, 0, 0
    for _ in range(200):
        out = _degraded(image, 1.0, rng)
        assert out.shape == image.shape and abs(float(out.mean() - image.mean())) < 0.1 * float(image.std())
        if torch.equal(out, image):
            untouched += 1
            continue
        residual = out - (image - image.mean()) * float((out - out.mean()).flatten() @ (image - image.mean()).flatten()
                                                         / ((image - image.mean()) ** 2).sum()) - out.mean()
        lowered += float(out.std()) < float(image.std())
        noisy += float(residual.std()) > 0.01
    assert 30 <= untouched <= 70  # a quarter of 200
    assert 60 <= noisy <= 140 and lowered >= 60


def test_a_run_resumes_from_its_checkpoint_and_refuses_another_configuration(tmp_path):
    samples = _disks(4)
    config = MaskRefinerConfig(width=4, depth=3, steps=20, batch_size=2, window=32, jitter=2)
    log = []
    first = train_mask_refiner(samples, config, tmp_path, log.append)
    assert (tmp_path / "last.pt").is_file() and [r["step"] for r in log] == []  # logs every 100 steps
    again = train_mask_refiner(samples, config, tmp_path)  # finished: nothing left to train
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="another configuration"):
        train_mask_refiner(samples, MaskRefinerConfig(width=4, depth=3, steps=30), tmp_path)


def test_the_samples_are_the_models_answers_in_the_model_input_frame(tiny_model):
    labels = np.zeros((100, 140), np.uint16)
    labels[20:40, 30:60] = 1
    labels[60:90, 90:110] = 2
    labels[5:7, 5:7] = 3  # too small to be sampled
    image = np.where(labels > 0, 200, 30).astype(np.uint8)
    samples = collect_mask_samples(tiny_model, [(image, labels)], seed=0)
    size = tiny_model.config.image_size
    assert samples.images.shape[1:] == (size, size)
    assert samples.low.shape[1:] == (size // 4, size // 4) and samples.target.shape[1:] == (size, size)
    assert set(samples.kind) <= set(range(len(KINDS))) and {0, 1} <= set(samples.kind)
    # two objects, each at least with its click and its box; the plane fills the input's width
    assert (samples.kind == 1).sum() == 2
    scale = size / 140
    areas = sorted({int(t.sum()) for t in samples.target})
    assert areas == pytest.approx(sorted([600 * scale**2, 600 * scale**2]), rel=0.15)


def test_the_refiner_travels_in_the_checkpoint_and_stays_when_a_decoder_is_added(tmp_path, tiny_sam):
    from napari_sam.core.models import load_model
    from napari_sam.model.checkpoint import read_checkpoint, write_checkpoint
    from napari_sam.model.instance_decoder import InstanceDecoder, InstanceDecoderConfig
    from napari_sam.train.instance_decoder import save_with_instance_decoder

    path = tmp_path / "model.pth"
    write_checkpoint(path, tiny_sam.state_dict(), {"name": "tiny"})
    refiner = train_mask_refiner(_disks(4), MaskRefinerConfig(width=4, depth=3, steps=5, batch_size=2, window=32))
    save_with_mask_refiner(path, refiner, {"steps": 5})
    model = load_model(path, device="cpu", dtype="float32")
    assert model.metadata["mask_refiner"] == {"steps": 5} and model.metadata["name"] == "tiny"
    for a, b in zip(refiner.state_dict().values(), model.mask_refiner.state_dict().values()):
        torch.testing.assert_close(a, b)
    # the official weights are untouched by the head beside them
    assert set(read_checkpoint(path).state_dict) == set(tiny_sam.state_dict())
    save_with_instance_decoder(model, InstanceDecoder(InstanceDecoderConfig(initial_features=4, scale=4)), path)
    assert MASK_REFINER_KEY in read_checkpoint(path).extras
    assert load_model(path, device="cpu", dtype="float32").mask_refiner is not None
