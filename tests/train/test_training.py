"""Fine-tuning: data, geometry, learning, checkpoints and resuming.

Most tests train a "mini" SAM whose model input is 256 pixels (16x16 embedding, 64x64
low-res masks): every code path of the real one at a sixteenth of the cost. Checkpoint
loading uses the conftest's tiny SAM with the standard 1024 input, the only kind
``load_model`` infers from a state dict.
"""

import copy

import numpy as np
import pytest
import tifffile
import torch

from napari_sam.core.models import load_model
from napari_sam.core.predictor import Predictor
from napari_sam.model.checkpoint import read_checkpoint
from napari_sam.train import (
    SegmentationDataset,
    Trainer,
    TrainingConfig,
    low_res_targets,
    object_ids,
    optimizer_state_path,
    train,
)

# Small, fast runs: two objects, one corrective iteration, no warm-up.
FAST = dict(
    steps=4, warmup_steps=0, learning_rate=1e-3, objects_per_image=2, corrective_iterations=1, min_object_pixels=10
)


@pytest.fixture(scope="module")
def crop(nuclei_2d):
    """A 64x48 piece of the real nuclei image with six nuclei (non-square on purpose)."""
    image, labels = nuclei_2d
    return image[208:272, 64:112], labels[208:272, 64:112]


@pytest.fixture
def data(crop):
    return SegmentationDataset.from_arrays([crop[0]], [crop[1]])


def weights(model, prefix=""):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


# -- data ------------------------------------------------------------------------------


def test_dataset_from_arrays_and_stack(crop):
    image, labels = crop
    assert object_ids(labels, min_pixels=10).size >= 2
    ds = SegmentationDataset.from_arrays([image, image.T], [labels, labels.T], names=["a", "b"])
    assert len(ds) == 2 and ds[1].name == "b"
    np.testing.assert_array_equal(ds[1].labels, labels.T)

    stack_labels = np.stack([labels, np.zeros_like(labels), labels[::-1]])
    stack = SegmentationDataset.from_stack(np.stack([image] * 3), stack_labels)
    assert stack.names == ["stack z=0", "stack z=2"]  # the empty plane is skipped
    np.testing.assert_array_equal(stack[1].labels, labels[::-1])
    assert len(SegmentationDataset.from_stack(np.stack([image] * 3), stack_labels, skip_empty=False)) == 3

    with pytest.raises(ValueError, match="same pixels"):
        SegmentationDataset.from_arrays([image], [labels[:10]])
    with pytest.raises(ValueError, match="2 images but 1"):
        SegmentationDataset.from_arrays([image, image], [labels])


def test_dataset_from_folder(tmp_path, crop, shared_dir):
    image, labels = crop
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    tifffile.imwrite(tmp_path / "images" / "one.tif", image)
    tifffile.imwrite(tmp_path / "labels" / "one.tif", labels)
    tifffile.imwrite(tmp_path / "images" / "vol.tif", np.stack([image, image]))
    tifffile.imwrite(tmp_path / "labels" / "vol.tif", np.stack([np.zeros_like(labels), labels]))
    ds = SegmentationDataset.from_folder(tmp_path)
    assert ds.names == ["one.tif", "vol.tif z=1"]
    np.testing.assert_array_equal(ds[1].image, image)
    np.testing.assert_array_equal(ds[1].labels, labels)
    assert ds.describe()["source"] == "folder"

    tifffile.imwrite(tmp_path / "images" / "orphan.tif", image)
    with pytest.raises(ValueError, match="orphan.tif"):
        SegmentationDataset.from_folder(tmp_path)

    real = SegmentationDataset.from_folder(shared_dir / "data" / "dsb2018_fluo")
    assert len(real) == 21
    assert real[0].image.shape[:2] == real[0].labels.shape


# -- geometry --------------------------------------------------------------------------


def test_low_res_targets_follow_the_padded_model_frame():
    masks = torch.zeros(1, 100, 200, dtype=torch.bool)
    masks[0, :, 100:] = True  # right half of a 100 x 200 plane
    # 1024 input: the plane becomes 512 x 1024, i.e. 128 x 256 low-res pixels, then padding
    t = low_res_targets(masks, (512, 1024), 1024)
    assert t.shape == (1, 1, 256, 256)
    assert t[0, 0, :128, 128:].all() and not t[0, 0, :128, :128].any()
    assert not t[0, 0, 128:].any()


def test_finer_targets_and_enlarged_logits_are_what_inference_draws(mini_sam):
    from napari_sam.train.frames import upscale_low_res

    masks = torch.zeros(1, 100, 200, dtype=torch.bool)
    masks[0, 10:13, 101:150] = True  # a strip 3 pixels high: 1.5 rows of the 4x grid, so half a 4x4 block
    fine = low_res_targets(masks, (512, 1024), 1024, upscale=4)
    assert fine.shape == (1, 1, 1024, 1024)  # the model input: the plane enlarged 5.12 times, then padding
    rows = fine[0, 0].any(dim=1).nonzero().flatten()
    assert 51 <= rows.min() <= 52 and 65 <= rows.max() <= 66  # rows 10-12 of 100 at 5.12 x: 51.2 to 66.6
    assert fine[0, 0, 512:].sum() == 0 and fine[0, 0, :, 768:].sum() == 0  # nothing in the padding
    half = low_res_targets(masks, (512, 1024), 1024, upscale=2)
    assert half.shape == (1, 1, 512, 512) and 0 < half.sum() < fine.sum() / 3
    assert torch.equal(low_res_targets(masks, (512, 1024), 1024, upscale=1), low_res_targets(masks, (512, 1024), 1024))
    # enlarged logits are those the model's post-processing draws in the model input
    size = mini_sam.config.image_size
    low = torch.randn(2, 3, size // 4, size // 4)
    torch.testing.assert_close(upscale_low_res(low, 4), mini_sam.postprocess_masks(low, (size, size), (size, size)))
    assert upscale_low_res(low, 1) is low
    # On every grid an outline lies where the enlarged logits put it: logits that rise
    # linearly across the input (bilinear enlargement keeps a linear ramp exact) cross 0 at
    # input column 102 (a low-res pixel's centre is at 4 j + 1.5), and the object is every
    # column from 102 on.
    size = mini_sam.config.image_size
    ramp = (4 * torch.arange(size // 4, dtype=torch.float32) + 1.5 - 101.5).expand(1, 1, size // 4, size // 4)
    plane = torch.zeros(1, size, size, dtype=torch.bool)
    plane[0, :, 102:] = True
    for up in (2, 4):
        target = low_res_targets(plane, (size, size), size, upscale=up)[0, 0] > 0
        drawn = upscale_low_res(ramp, up)[0, 0] > 0
        assert torch.equal(target, drawn) and target[:, 102 * up // 4:].all() and not target[:, :102 * up // 4].any()
    for bad in (3, 8, True):
        with pytest.raises(ValueError, match="upscale must be 1, 2 or 4"):
            low_res_targets(plane, (size, size), size, upscale=bad)
    with pytest.raises(ValueError, match="mask_loss_upscale must be 1, 2 or 4"):
        TrainingConfig(mask_loss_upscale=3)


def test_a_step_judged_on_the_finer_grid_learns(mini_sam, data):
    cfg = TrainingConfig(**dict(FAST, mask_loss_upscale=4))
    trainer = Trainer(mini_sam, data, cfg, device="cpu")
    before = trainer.evaluate_loss(seed=5)
    records = list(trainer.run())
    assert all(np.isfinite(r.loss) and r.loss > 0 and 0 <= r.train_iou <= 1 for r in records)
    assert trainer.evaluate_loss(seed=5) < 0.8 * before
    # a different loss from the low-res one on the same draws
    low_res = Trainer(mini_sam, data, TrainingConfig(**FAST), device="cpu")
    assert low_res.evaluate_loss(seed=5) != pytest.approx(trainer.evaluate_loss(seed=5))


def test_training_prompts_use_the_predictors_coordinates(mini_sam, crop):
    image, labels = crop
    data = SegmentationDataset.from_arrays([image], [labels])
    trainer = Trainer(mini_sam, data, TrainingConfig(**FAST), device="cpu")
    feats = trainer._features(data, 0, grad=False)
    predictor = Predictor(mini_sam)
    emb = predictor.set_image(image)
    assert (emb.input_size, emb.original_size) == (feats.input_size, feats.original_size)
    torch.testing.assert_close(emb.features, feats.features)

    from napari_sam.train.frames import model_scale

    box = np.array([5.0, 7.0, 30.0, 40.0])
    expected = predictor.predict(box=box, multimask=False).low_res_logits
    t_box = torch.as_tensor(box * np.tile(model_scale(feats.input_size, feats.original_size), 2), dtype=torch.float32)
    got, _ = trainer._decode(feats, None, None, t_box[None], None, False)
    np.testing.assert_allclose(got[0].detach().numpy(), expected, atol=1e-4)


def test_objects_lost_in_the_low_res_frame_are_not_trained_on(mini_sam):
    labels = np.zeros((512, 512), np.uint16)
    labels[100:104, 100:105] = 1  # 20 pixels: below one low-res pixel of the mini model (8x8)
    image = (labels > 0).astype(np.uint8) * 200
    # whole planes squeezed into the input (native tiles would keep the object visible)
    cfg = TrainingConfig(**dict(FAST, corrective_iterations=0, native_tiles=False))
    trainer = Trainer(mini_sam, SegmentationDataset.from_arrays([image], [labels]), cfg, device="cpu")
    assert trainer.image_loss(trainer.train_data, 0, np.random.default_rng(0)) is None
    labels[300:360, 300:380] = 2
    trainer = Trainer(mini_sam, SegmentationDataset.from_arrays([image], [labels]), cfg, device="cpu")
    parts = trainer.image_loss(trainer.train_data, 0, np.random.default_rng(0))
    assert parts is not None and parts.loss.requires_grad


# -- learning --------------------------------------------------------------------------


def test_training_lowers_the_loss_on_a_fixed_batch(mini_sam, data):
    trainer = Trainer(mini_sam, data, TrainingConfig(**FAST), device="cpu")
    before = trainer.evaluate_loss(seed=5)
    assert trainer.evaluate_loss(seed=5) == before  # really a fixed batch
    records = list(trainer.run())
    assert [r.step for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r.loss) and r.loss > 0 for r in records)
    assert records[0].learning_rate == pytest.approx(1e-3) and records[-1].learning_rate < 1e-3
    after = trainer.evaluate_loss(seed=5)
    assert after < 0.8 * before


def test_the_iou_ranking_term_joins_the_iou_loss_of_lone_clicks(mini_sam, data):
    def losses(box_probability):
        """The same step's loss parts without and with the ranking term."""
        cfg = dict(FAST, box_probability=box_probability)
        return [Trainer(mini_sam, data, TrainingConfig(**cfg, iou_rank_weight=w), device="cpu")
                .image_loss(data, 0, np.random.default_rng(3)) for w in (0.0, 1.0)]

    a, b = losses(0.0)  # lone clicks: only the IoU part grows
    assert float(a.mask_loss) == pytest.approx(float(b.mask_loss))
    assert float(b.iou_loss) > float(a.iou_loss)
    a, b = losses(1.0)  # a box gets one mask: nothing to rank, the same loss
    assert float(b.iou_loss) == pytest.approx(float(a.iou_loss))
    with pytest.raises(ValueError, match="iou_rank_weight"):
        TrainingConfig(iou_rank_weight=-1)


def test_decoder_mode_leaves_the_image_encoder_bit_for_bit_unchanged(mini_sam, data):
    encoder, decoder = weights(mini_sam, "image_encoder."), weights(mini_sam, "mask_decoder.")
    trainer = Trainer(mini_sam, data, TrainingConfig(**dict(FAST, steps=1)), device="cpu")
    next(trainer.run())
    for k, v in weights(mini_sam, "image_encoder.").items():
        assert torch.equal(v, encoder[k]), k
    assert any(not torch.equal(v, decoder[k]) for k, v in weights(mini_sam, "mask_decoder.").items())


def test_full_mode_trains_the_encoder_except_frozen_blocks(mini_sam, data):
    before = weights(mini_sam)
    cfg = TrainingConfig(**dict(FAST, steps=1, mode="full", freeze_encoder_blocks=1, corrective_iterations=0))
    trainer = Trainer(mini_sam, data, cfg, device="cpu")
    next(trainer.run())
    after = weights(mini_sam)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen = ("image_encoder.blocks.0.", "image_encoder.patch_embed.", "image_encoder.pos_embed")
    assert not any(k.startswith(frozen) for k in changed)
    assert any(k.startswith("image_encoder.blocks.1.") for k in changed)
    assert any(k.startswith("mask_decoder.") for k in changed)


def test_validation_records_and_learning_rate_schedule(mini_sam, data):
    cfg = TrainingConfig(**dict(FAST, steps=2, validate_every=2, corrective_iterations=0))
    records = list(Trainer(mini_sam, data, cfg, validation_data=data, device="cpu").run())
    assert records[0].validation_iou is None
    val = records[1].validation
    assert 0 <= records[1].validation_iou <= 1 and val["objects"] == 6
    assert val["iou"] == pytest.approx((val["point"] + val["box"]) / 2)

    sched = TrainingConfig(steps=110, warmup_steps=10, learning_rate=1.0)
    assert [sched.learning_rate_at(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert sched.learning_rate_at(60) == pytest.approx(0.5)  # half way through the cosine
    assert sched.learning_rate_at(109) < 0.001
    step = TrainingConfig(steps=100, warmup_steps=0, learning_rate=1.0, schedule="step", decay_steps=(50, 80))
    assert [step.learning_rate_at(s) for s in (49, 50, 80)] == pytest.approx([1.0, 0.1, 0.01])
    with pytest.raises(ValueError, match="mode"):
        TrainingConfig(mode="encoder")
    with pytest.raises(ValueError, match="freeze_encoder_blocks"):
        TrainingConfig(freeze_encoder_blocks=2)


# -- checkpoints -----------------------------------------------------------------------


def test_checkpoint_reloads_with_load_model_and_gives_identical_outputs(tiny_sam, crop, tmp_path):
    model = copy.deepcopy(tiny_sam)
    data = SegmentationDataset.from_arrays([crop[0]], [crop[1]])
    cfg = TrainingConfig(**dict(FAST, steps=1, objects_per_image=1, corrective_iterations=0, seed=3))
    trainer = Trainer(model, data, cfg, device="cpu")
    record = next(trainer.run())
    path = trainer.save(tmp_path / "tuned.pth")

    loaded = load_model(path, device="cpu", dtype="float32")  # exact: the weights as trained
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert any(not torch.equal(v, tiny_sam.state_dict()[k]) for k, v in model.state_dict().items())
    emb = torch.randn(1, 256, 64, 64)
    pts, lbl = torch.tensor([[[300.0, 200.0]]]), torch.ones(1, 1, dtype=torch.int64)
    with torch.no_grad():
        a = model.decode(emb, pts, lbl)
        b = loaded.decode(emb, pts, lbl)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    meta = loaded.metadata
    assert meta["config"]["encoder"]["embed_dim"] == 32
    training = meta["training"]
    assert (training["mode"], training["steps"], training["seed"]) == ("decoder", 1, 3)
    assert training["data"]["source"] == "arrays" and training["date"]
    assert training["losses"] == [{"step": 1, "loss": pytest.approx(record.loss)}]
    assert training["settings"]["objects_per_image"] == 1
    assert optimizer_state_path(path).is_file()


def test_resume_continues_from_the_saved_step(mini_sam, data, tmp_path):
    cfg = TrainingConfig(**dict(FAST, steps=2))
    straight = Trainer(copy.deepcopy(mini_sam), data, cfg, device="cpu")
    list(straight.run())

    first = Trainer(mini_sam, data, cfg, device="cpu")
    list(first.run(until=1))
    path = first.save(tmp_path / "half.pth")
    resumed = Trainer.resume(path, data, device="cpu")
    # the loss weights left open were filled in from the base model (a random one: SAM's)
    assert resumed.step == 1 and resumed.config == first.config and len(resumed.history) == 1
    assert (resumed.config.focal_weight, resumed.config.focal_alpha) == (20.0, 0.25)
    assert resumed.optimizer.state_dict()["state"], "the AdamW moments were restored"
    records = list(resumed.run())
    assert [r.step for r in records] == [2]
    # Same draws and same optimizer state: the same weights as an uninterrupted run.
    for k, v in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert read_checkpoint(resumed.save(path)).metadata["training"]["steps"] == 2

    resumed.save(path)
    whole = optimizer_state_path(path).read_bytes()
    optimizer_state_path(path).write_bytes(whole[: len(whole) // 2])  # torn by a crash or a full disk
    with pytest.warns(UserWarning, match=r"optimizer state at .* cannot be read .*fresh AdamW"):
        assert Trainer.resume(path, data, device="cpu").step == 2
    torch.save({"optimizer": {"state": 5}, "step": 2, "param_names": resumed.param_names}, optimizer_state_path(path))
    with pytest.warns(UserWarning, match=r"is not AdamW's for these parameters .*fresh AdamW"):
        assert not Trainer.resume(path, data, device="cpu").optimizer.state_dict()["state"]
    optimizer_state_path(path).unlink()
    with pytest.warns(UserWarning, match="no optimizer state at .*fresh AdamW"):
        Trainer.resume(path, data, device="cpu")


def test_a_full_disk_is_said_as_such_and_leaves_no_partial_file(mini_sam, data, tmp_path, monkeypatch):
    import errno
    import os

    from napari_sam.model import atomic_save as checkpoint

    def full(obj, target):
        with open(target, "wb") as fh:
            fh.write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    def quota_spent(fd, data):  # what the probe's write meets on a full disk or a spent quota
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr(checkpoint.os, "write", quota_spent)
    trainer = Trainer(mini_sam, data, TrainingConfig(**FAST), device="cpu")
    with pytest.raises(OSError) as err:
        trainer.save(tmp_path / "ft.pth")
    assert err.value.errno == errno.EDQUOT and err.value.filename == str(tmp_path / "ft.pth")
    assert list(tmp_path.iterdir()) == []  # neither the partial file nor the probe
    monkeypatch.undo()
    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(RuntimeError, match="unexpected pos"):  # the disk takes the probe: torch's own error
        trainer.save(tmp_path / "ft.pth")


def test_train_convenience_saves_the_result(mini_sam, data, tmp_path):
    path = tmp_path / "out.pth"
    cfg = TrainingConfig(**dict(FAST, steps=2, corrective_iterations=0))
    trainer = train(mini_sam, data, cfg, checkpoint=path, progress=False, device="cpu")
    assert trainer.step == 2
    assert read_checkpoint(path).metadata["training"]["steps"] == 2


@pytest.mark.parametrize("probability, expected", [(1.0, [False, True, True]), (0.0, [False, False, False])])
def test_corrective_iterations_feed_back_the_mask_only_as_often_as_asked(mini_sam, data, probability, expected):
    cfg = TrainingConfig(mode="decoder", **(FAST | dict(corrective_iterations=2, box_probability=0.0)),
                         mask_prompt_probability=probability)
    trainer = Trainer(mini_sam, data, cfg, device="cpu")
    seen = []
    decode = trainer._decode

    def spy(feats, points, labels, boxes, mask_input, multimask):
        seen.append(mask_input is not None)
        return decode(feats, points, labels, boxes, mask_input, multimask)

    trainer._decode = spy
    trainer.image_loss(data, 0, np.random.default_rng(0))
    assert seen == expected
    with pytest.raises(ValueError, match="mask_prompt_probability"):
        TrainingConfig(mask_prompt_probability=1.5)


def test_central_clicks_open_in_the_inner_half_and_leave_earlier_seeds_alone():
    from napari_sam.core.masks import depth
    from napari_sam.core.prompt_simulation import random_point
    from napari_sam.train.session import first_prompt

    yy, xx = np.mgrid[:64, :64]
    masks = np.stack([(yy - 20) ** 2 + (xx - 20) ** 2 <= 10**2, (yy - 44) ** 2 + (xx - 40) ** 2 <= 14**2])
    inner = np.stack([depth(m) >= 0.5 * depth(m).max() for m in masks])
    central = TrainingConfig(box_probability=0.0, central_click_probability=1.0)
    for seed in range(30):
        boxes, points, labels = first_prompt(masks, central, np.random.default_rng(seed))
        assert boxes is None and points.shape == (2, 1, 2) and labels.tolist() == [[1], [1]]
        for k, (x, y) in enumerate(points[:, 0].astype(int)):
            assert inner[k, y, x], (seed, k)
    # off (SAM's recipe): exactly the uniform draws a seed gave before the option existed
    uniform = TrainingConfig(box_probability=0.0, central_click_probability=0.0)
    rng, twin = np.random.default_rng(7), np.random.default_rng(7)
    _, points, _ = first_prompt(masks, uniform, rng)
    twin.random()  # the box-or-point draw
    np.testing.assert_array_equal(points[:, 0], [random_point(m, twin) for m in masks])
    with pytest.raises(ValueError, match="central_click_probability"):
        TrainingConfig(central_click_probability=1.5)


def test_a_fine_tune_keeps_the_models_mask_refiner_and_where_it_acts(mini_sam, data, tmp_path):
    from napari_sam.model.mask_chooser import MaskChooser
    from napari_sam.model.mask_refiner import MaskRefiner

    torch.manual_seed(1)
    mini_sam.mask_refiner = MaskRefiner(width=4, depth=3)
    mini_sam.mask_refiner.chooser = MaskChooser(8)
    mini_sam.metadata = {"mask_refiner": {"refine_below_magnification": 2.0}, "mask_chooser": {"steps": 3}}
    trainer = Trainer(mini_sam, data, TrainingConfig(**dict(FAST, steps=1)), device="cpu")
    list(trainer.run())
    model = load_model(trainer.save(tmp_path / "ft.pth"), device="cpu", dtype="float32")
    # it reads a mask's logits and the pixels, not the embedding: the tuned decoder's answers still use it
    assert model.metadata["mask_refiner"] == {"refine_below_magnification": 2.0}
    # the chooser ranks by the IoU head the run retrained: the fine-tuned model picks by its own head
    assert "mask_chooser" not in model.metadata and model.mask_refiner.chooser is None
    assert mini_sam.mask_refiner.chooser is not None  # the model in memory keeps it
    kept = {k: v for k, v in mini_sam.mask_refiner.state_dict().items() if not k.startswith("chooser.")}
    assert kept.keys() == model.mask_refiner.state_dict().keys()
    for a, b in zip(kept.values(), model.mask_refiner.state_dict().values()):
        torch.testing.assert_close(a.float(), b)
    assert not any(k.startswith("mask_refiner") for k in read_checkpoint(tmp_path / "ft.pth").state_dict)
