"""What makes fine-tuning with the defaults help: training on the tiles inference embeds,
the base model's own loss, the best validation's weights kept, a run sized to its time
budget, and the instance decoder carried along when the encoder does not change."""

import numpy as np
import pytest
import torch

from napari_sam.core.models import load_model
from napari_sam.core.tiling import TileGrid, default_tiling
from napari_sam.model.checkpoint import read_checkpoint
from napari_sam.train import SegmentationDataset, Trainer, TrainingConfig, train
from napari_sam.train.budget import TimeBudget, steps_for_minutes
from napari_sam.train.tiles import inference_tiles

FAST = dict(steps=3, warmup_steps=0, learning_rate=1e-3, objects_per_image=2, corrective_iterations=1,
            min_object_pixels=10, validate_every=1, validation_objects=4)


def _plane():
    """A 600 x 520 plane: four squares and one object across the first interiors' edge."""
    labels = np.zeros((600, 520), np.uint16)
    labels[20:60, 20:60] = 1
    labels[300:340, 300:340] = 2
    labels[500:540, 40:80] = 3
    labels[400:440, 450:490] = 4
    grid = TileGrid(labels.shape, *default_tiling(256))
    edge = grid[0, 0].inner[3]  # first column boundary of the interiors
    labels[100:130, edge - 100:edge + 30] = 5  # under half of it inside the next tile's region
    image = (labels > 0).astype(np.uint8) * 180 + np.arange(520, dtype=np.uint8)[None] % 20
    return image, labels, grid


def test_tiles_are_the_regions_inference_embeds_at_native_resolution():
    image, labels, grid = _plane()
    data = inference_tiles(SegmentationDataset.from_arrays([image], [labels], names=["p"]), 256)
    assert len(grid) == 12 and grid.grid_shape == (4, 3)
    by_name = {data.names[i]: data[i] for i in range(len(data))}
    for tile in grid:
        name = f"p tile {tile.index}"
        if name not in by_name:
            # left out only because no object of at least one pixel survives in it
            kept = np.unique(labels[tile.outer_slices])
            assert all(np.sum(labels == i) > 2 * np.sum(labels[tile.outer_slices] == i) for i in kept if i)
            continue
        pair = by_name[name]
        np.testing.assert_array_equal(pair.image, image[tile.outer_slices])  # not resized
        crop = labels[tile.outer_slices]
        for i in np.unique(crop)[1:]:
            inside = np.sum(crop == i) / np.sum(labels == i)
            assert (i in pair.labels) == (inside >= 0.5), (name, i, inside)
    # object 5 lies 100:30 across the edge: the left tile holds all of it, the right one
    # under half, which is removed there, leaving it nothing to learn from
    assert 5 in by_name["p tile (0, 0)"].labels and "p tile (0, 1)" not in by_name
    assert 0.3 < np.mean(labels[grid[0, 1].outer_slices] == 5) * grid[0, 1].shape[0] * grid[0, 1].shape[1] / 3900 < 0.5
    assert data.description["tiles"]["tiles"] == len(data) and data.description["tiles"]["magnifications"] == [1.0]


def test_tiles_follow_the_magnification_inference_embeds_at():
    image, labels, _ = _plane()
    pairs = SegmentationDataset.from_arrays([image], [labels], names=["p"])
    grid = TileGrid(labels.shape, *default_tiling(256, 2.0))  # 128-pixel regions, enlarged 2x by the model
    assert 100 < max(max(t.shape) for t in grid) <= 128 and len(grid) > 12
    chosen = []

    def choose(plane):
        chosen.append(plane.shape)
        return 2.0

    data = inference_tiles(pairs, 256, magnification=choose)
    assert chosen == [image.shape]  # asked once per plane, with the plane
    assert data.description["tiles"]["magnifications"] == [2.0]
    by_name = {data.names[i]: data[i] for i in range(len(data))}
    for tile in grid:
        if f"p tile {tile.index}" in by_name:
            np.testing.assert_array_equal(by_name[f"p tile {tile.index}"].image, image[tile.outer_slices])
    assert max(max(by_name[n].labels.shape) for n in by_name) <= 128
    assert set(np.unique(np.concatenate([by_name[n].labels.ravel() for n in by_name]))) == {0, 1, 2, 3, 4, 5}


def test_small_planes_stay_whole_and_empty_tiles_are_refused():
    labels = np.zeros((200, 180), np.uint8)
    labels[50:90, 60:100] = 3
    image = labels * 50
    data = inference_tiles(SegmentationDataset.from_arrays([image], [labels], names=["small"]), 256)
    assert len(data) == 1 and data.names == ["small"]
    np.testing.assert_array_equal(data[0].labels, labels)
    with pytest.raises(ValueError, match="no tile of the 1 plane"):
        inference_tiles(SegmentationDataset.from_arrays([image], [np.zeros_like(labels)]), 256)
    with pytest.raises(ValueError, match="min_inside"):
        inference_tiles(data, 256, min_inside=0)


def test_the_trainer_sees_tiles_unless_told_otherwise(mini_sam):
    image, labels, _ = _plane()
    plane = SegmentationDataset.from_arrays([image], [labels])
    tiled = Trainer(mini_sam, plane, TrainingConfig(**FAST), validation_data=plane, device="cpu")
    assert len(tiled.train_data) > 1 and all(p.image.shape[0] <= 256 for p in map(tiled.train_data.__getitem__,
                                                                                 range(len(tiled.train_data))))
    assert len(tiled.validation_data) == len(tiled.train_data)
    whole = Trainer(mini_sam, plane, TrainingConfig(**FAST, native_tiles=False), device="cpu")
    assert len(whole.train_data) == 1 and whole.train_data[0].image.shape == (600, 520)


def test_loss_weights_left_open_come_from_the_model_being_trained(mini_sam):
    data = SegmentationDataset.from_arrays([_plane()[0]], [_plane()[1]])
    plain = Trainer(mini_sam, data, TrainingConfig(**FAST), device="cpu")
    assert (plain.config.focal_weight, plain.config.focal_alpha) == (20.0, 0.25)  # SAM's
    mini_sam.metadata = {"training": {"settings": {"focal_weight": 1.0, "focal_alpha": -1.0}}}
    own = Trainer(mini_sam, data, TrainingConfig(**FAST), device="cpu")
    assert (own.config.focal_weight, own.config.focal_alpha) == (1.0, -1.0)
    chosen = Trainer(mini_sam, data, TrainingConfig(**FAST, focal_weight=5.0), device="cpu")
    assert (chosen.config.focal_weight, chosen.config.focal_alpha) == (5.0, -1.0)
    # the shipped default model learned with 1:1 and no alpha, and says so
    settings = load_model("default").metadata["training"]["settings"]
    assert TrainingConfig().with_base_recipe({"training": {"settings": settings}}).focal_weight == 1.0


def test_the_prompt_recipe_left_open_comes_from_the_model_being_trained(mini_sam):
    data = SegmentationDataset.from_arrays([_plane()[0]], [_plane()[1]])
    open_recipe = {k: v for k, v in FAST.items() if k != "corrective_iterations"}
    plain = Trainer(mini_sam, data, TrainingConfig(**open_recipe), device="cpu").config
    assert (plain.iou_rank_weight, plain.corrective_iterations, plain.mask_prompt_probability) == (0.0, 3, 1.0)
    assert plain.grad_clip == 0.0
    recorded = {"iou_rank_weight": 1.0, "corrective_iterations": 4, "mask_prompt_probability": 0.7, "grad_clip": 1.0}
    mini_sam.metadata = {"training": {"settings": recorded}}
    own = Trainer(mini_sam, data, TrainingConfig(**open_recipe), device="cpu").config
    assert (own.iou_rank_weight, own.corrective_iterations, own.mask_prompt_probability) == (1.0, 4, 0.7)
    assert own.grad_clip == 1.0
    assert isinstance(own.corrective_iterations, int) and own.to_dict()["corrective_iterations"] == 4
    chosen = Trainer(mini_sam, data, TrainingConfig(**open_recipe, iou_rank_weight=0.0, corrective_iterations=1),
                     device="cpu").config
    assert (chosen.iou_rank_weight, chosen.corrective_iterations, chosen.mask_prompt_probability) == (0.0, 1, 0.7)
    # a recorded value out of range is refused, not trained with
    with pytest.raises(ValueError, match="mask_prompt_probability"):
        TrainingConfig().with_base_recipe({"training": {"settings": {"mask_prompt_probability": 3.0}}})
    # the shipped default model records the recipe it learned with
    shipped = TrainingConfig().with_base_recipe(load_model("default").metadata)
    assert (shipped.iou_rank_weight, shipped.corrective_iterations, shipped.mask_prompt_probability) == (1.0, 4, 0.7)
    assert shipped.grad_clip == 1.0


def test_fine_tuning_draws_boxes_within_a_pixel_of_the_labels_unless_told_to_jitter_them():
    from napari_sam.core.masks import bounding_box
    from napari_sam.train.session import first_prompt

    yy, xx = np.mgrid[:80, :80]
    masks = np.stack([(yy - 20) ** 2 + (xx - 25) ** 2 <= 12**2, (yy - 55) ** 2 + (xx - 50) ** 2 <= 18**2])
    exact = np.stack([bounding_box(m) for m in masks])
    shifts = {}
    for noise in (None, 0.0, 0.1):
        config = TrainingConfig(box_probability=1.0, **({} if noise is None else {"box_noise": noise}))
        drawn = [first_prompt(masks, config, np.random.default_rng(seed)) for seed in range(20)]
        assert all(points.shape == (2, 0, 2) for _, points, _ in drawn)
        shifts[noise] = np.mean([np.abs(boxes - exact).mean() for boxes, _, _ in drawn])
    # 2 % of a 25-37 pixel side by default, SAM's 10 % on request, none at 0
    assert shifts[0.0] == 0 and 0.2 < shifts[None] < 1.0 and shifts[0.1] > 2.0
    # the shipped model learned with SAM's jitter and records it; a fine-tune does not inherit it
    shipped = load_model("default").metadata
    assert shipped["training"]["settings"]["box_noise"] == 0.1
    assert TrainingConfig().with_base_recipe(shipped).box_noise == 0.02
    with pytest.raises(ValueError, match="box_noise"):
        TrainingConfig(box_noise=-0.1)


def test_fine_tuning_opens_most_lone_clicks_where_people_click(mini_sam, tmp_path):
    from napari_sam.core.masks import depth
    from napari_sam.model.checkpoint import write_checkpoint
    from napari_sam.train.session import first_prompt

    yy, xx = np.mgrid[:80, :80]
    masks = np.stack([(yy - 20) ** 2 + (xx - 25) ** 2 <= 12**2, (yy - 55) ** 2 + (xx - 50) ** 2 <= 18**2])
    inner = np.stack([depth(m) >= 0.5 * depth(m).max() for m in masks])
    shares = {}
    for share in (None, 0.0):
        config = TrainingConfig(box_probability=0.0, **({} if share is None else {"central_click_probability": share}))
        points = [first_prompt(masks, config, np.random.default_rng(seed))[1][:, 0] for seed in range(200)]
        hits = [inner[k, y, x] for p in points for k, (x, y) in enumerate(p.astype(int))]
        shares[share] = np.mean(hits)
    # inner halves are about a quarter of each disc: uniform clicks hit them that often,
    # the default (three in four clicks drawn there) about 0.75 + 0.25 * 0.25
    assert 0.15 < shares[0.0] < 0.35 and 0.75 < shares[None] < 0.88
    # the shipped model learned with uniform clicks; a fine-tune does not inherit that
    shipped = load_model("default").metadata
    assert not shipped["training"]["settings"].get("central_click_probability")
    assert TrainingConfig().with_base_recipe(shipped).central_click_probability == 0.75
    # a run saved before the setting existed drew uniformly, and resumes that way
    image, labels, _ = _plane()
    data = SegmentationDataset.from_arrays([image], [labels])
    path = Trainer(mini_sam, data, TrainingConfig(**FAST), device="cpu").save(tmp_path / "old.pth", optimizer=False)
    old = read_checkpoint(path)
    del old.metadata["training"]["settings"]["central_click_probability"]
    write_checkpoint(path, old.state_dict, old.metadata)
    assert Trainer.resume(path, data, device="cpu").config.central_click_probability == 0.0


def test_the_run_ends_with_the_best_validations_weights(mini_sam, tmp_path, monkeypatch):
    image, labels, _ = _plane()
    data = SegmentationDataset.from_arrays([image], [labels])
    trainer = Trainer(mini_sam, data, TrainingConfig(**FAST), validation_data=data, device="cpu")
    scores = iter([0.4, 0.5, 0.7, 0.6])  # the first for the starting weights
    monkeypatch.setattr(trainer, "validate", lambda data=None: {"iou": next(scores), "point": 0, "box": 0})
    weights = {}
    for record in trainer.run():
        weights[record.step] = trainer.model.mask_decoder.iou_prediction_head.layers[0].weight.detach().clone()
    assert trainer.best == (2, 0.7) and not torch.equal(weights[2], weights[3])
    assert trainer.keep_best() == 2 and trainer.weights_step == 2
    assert torch.equal(trainer.model.mask_decoder.iou_prediction_head.layers[0].weight, weights[2])
    path = trainer.save(tmp_path / "best.pth")
    meta = read_checkpoint(path).metadata["training"]
    assert meta["steps"] == 3 and meta["weights_from_step"] == 2 and meta["best_validation"] == {"step": 2, "iou": 0.7}
    assert [h.get("validation_iou") for h in meta["losses"]] == [0.5, 0.7, 0.6]



def test_a_save_in_the_middle_of_a_run_keeps_the_best_weights_for_a_resumed_run(mini_sam, tmp_path, monkeypatch):
    # a run killed after a periodic save (out of memory, kill -9) must still end with its best weights
    image, labels, _ = _plane()
    data = SegmentationDataset.from_arrays([image], [labels])
    trainer = Trainer(mini_sam, data, TrainingConfig(**FAST), validation_data=data, device="cpu")
    scores = iter([0.4, 0.7, 0.5])  # the starting weights, then steps 1 and 2
    monkeypatch.setattr(trainer, "validate", lambda data=None: {"iou": next(scores), "point": 0, "box": 0})
    list(trainer.run(until=2))
    assert trainer.best == (1, 0.7)
    best = {n: v.clone() for n, v in trainer.best_state.items()}
    path = trainer.save(tmp_path / "run.pth")  # the periodic save: step 2's weights
    assert read_checkpoint(path).metadata["training"]["weights_from_step"] == 2
    resumed = Trainer.resume(path, data, validation_data=data, device="cpu")
    assert resumed.best == (1, 0.7) and resumed.step == 2
    monkeypatch.setattr(resumed, "validate", lambda data=None: {"iou": 0.6, "point": 0, "box": 0})
    list(resumed.run())
    assert resumed.keep_best() == 1
    named = dict(resumed.model.named_parameters())
    assert all(torch.equal(named[n].detach().cpu(), v) for n, v in best.items())
    # the final file holds the best weights: nothing more beside them
    resumed.save(tmp_path / "run.pth")
    from napari_sam.train.checkpoints import optimizer_state_path

    assert "best" not in torch.load(optimizer_state_path(tmp_path / "run.pth"), weights_only=True)

def test_a_time_budget_sizes_the_schedule(mini_sam):
    image, labels, _ = _plane()
    data = SegmentationDataset.from_arrays([image], [labels])
    trainer = Trainer(mini_sam, data, TrainingConfig(**dict(FAST, steps=100_000, warmup_steps=50)),
                      validation_data=data, device="cpu")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    total = steps_for_minutes(trainer, 0.1)
    assert 1 <= total < 100_000 and trainer.config.steps == total and trainer.step == 0
    assert trainer.config.warmup_steps == min(50, max(1, total // 10))
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters()), "measuring changed the model"
    with pytest.raises(ValueError, match="do not hold one training step"):
        steps_for_minutes(trainer, 1e-6)
    budget = TimeBudget(trainer, 0.05)
    list(trainer.run(until=2))
    resized = budget.resize(trainer)
    assert resized >= 3 and trainer.config.steps == resized
    run = train(trainer, minutes=0.05, progress=False)
    assert 3 <= run.step <= run.config.steps


def test_a_time_budget_never_grows_a_run_past_its_steps_at_most(mini_sam):
    # the training widget: "minutes" sizes the schedule, "steps at most" caps it (with its warm-up)
    from napari_sam.train.run import run_steps

    image, labels, _ = _plane()
    data = SegmentationDataset.from_arrays([image], [labels])
    trainer = Trainer(mini_sam, data, TrainingConfig(**dict(FAST, steps=100_000, warmup_steps=50)),
                      validation_data=data, device="cpu")
    records = list(run_steps(trainer, minutes=30, max_steps=4))
    assert [r.step for r in records] == [1, 2, 3, 4] and trainer.config.steps == 4
    assert trainer.config.warmup_steps == 1


def test_decoder_fine_tuning_keeps_the_instance_decoder(tmp_path, nuclei_2d):
    image, labels = nuclei_2d
    data = SegmentationDataset.from_arrays([image[:200, :200]], [labels[:200, :200]])
    cfg = dict(FAST, steps=1, validate_every=0, learning_rate=1e-4)
    base = load_model("default")
    assert base.instance_decoder is not None
    tuned = train(base, data, TrainingConfig(**cfg), checkpoint=tmp_path / "d.pth", progress=False)
    model = load_model(tmp_path / "d.pth")
    assert model.instance_decoder is not None and model.metadata["automatic"] == base.metadata["automatic"]
    for k, v in base.instance_decoder.state_dict().items():
        assert torch.equal(model.instance_decoder.state_dict()[k], v.float()), k
    assert tuned.step == 1 and model.metadata["training"]["settings"]["focal_weight"] == 1.0
    full = train(load_model("default"), data, TrainingConfig(**dict(cfg, mode="full")),
                 checkpoint=tmp_path / "f.pth", progress=False)
    assert full.step == 1 and load_model(tmp_path / "f.pth").instance_decoder is None
    # both keep the scale advice: they were trained on the tiles it gives
    assert base.metadata["scale"] == {"object_diameter": 30.0, "box_diameter": 36.0}
    assert model.metadata["scale"] == load_model(tmp_path / "f.pth").metadata["scale"] == base.metadata["scale"]
    # and the stain advice: they learned H&E as its haematoxylin channel (train/features.py)
    assert model.metadata["stain"] == load_model(tmp_path / "f.pth").metadata["stain"] == "haematoxylin"


def test_a_run_that_never_beats_the_starting_weights_keeps_them(mini_sam, monkeypatch):
    image, labels, _ = _plane()
    data = SegmentationDataset.from_arrays([image], [labels])
    trainer = Trainer(mini_sam, data, TrainingConfig(**FAST), validation_data=data, device="cpu")
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    scores = iter([0.8, 0.5, 0.7, 0.6])
    monkeypatch.setattr(trainer, "validate", lambda data=None: {"iou": next(scores), "point": 0, "box": 0})
    list(trainer.run())
    assert trainer.best == (0, 0.8) and trainer.keep_best() == 0
    assert all(torch.equal(start[n], p) for n, p in trainer.model.named_parameters())


def test_the_command_line_fills_its_minutes_and_keeps_the_best(tmp_path, nuclei_2d, capsys):
    import tifffile

    from napari_sam.cli import main

    image, labels = nuclei_2d
    for sub in ("images", "labels"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    for k, (y, x) in enumerate([(0, 0), (200, 0), (0, 200), (200, 200)]):
        tifffile.imwrite(tmp_path / "data" / "images" / f"{k}.tif", image[y:y + 180, x:x + 180])
        tifffile.imwrite(tmp_path / "data" / "labels" / f"{k}.tif", labels[y:y + 180, x:x + 180])
    out = tmp_path / "tuned.pth"
    assert main(["train", str(tmp_path / "data"), "--model", "default", "--out", str(out), "--minutes", "0.1",
                 "--device", "cpu", "--box-noise", "0.05", "--central-clicks", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "minute(s) hold about" in printed and "focal:dice 1:1" in printed and f"saved {out}" in printed
    assert "box jitter 0.05, central clicks 0.5" in printed
    model = load_model(out)
    training = model.metadata["training"]
    assert training["settings"]["native_tiles"] and training["settings"]["learning_rate"] is None
    assert training["settings"]["box_noise"] == 0.05 and training["settings"]["central_click_probability"] == 0.5
    assert training["best_validation"]["step"] == training["weights_from_step"] <= training["steps"]
    assert model.instance_decoder is not None  # decoder mode: automatic segmentation still works
