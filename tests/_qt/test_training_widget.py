"""What the training widget must not lose: files under "save as", the trained weights when
stopped or closed mid-run, and its own state after a failed or early-stopped run."""

import hashlib

import numpy as np
import pytest
import tifffile

pytestmark = pytest.mark.viewer


@pytest.fixture
def trainer_widget(make_napari_viewer, nuclei_2d, tiny_checkpoint, monkeypatch, tmp_path):
    from napari_sam._qt.training import TrainingWidget

    monkeypatch.setenv("NAPARI_SAM_MODEL", str(tiny_checkpoint))
    viewer = make_napari_viewer()
    image = viewer.add_image(np.stack([nuclei_2d[0][:128, :128], nuclei_2d[0][128:256, :128]]), name="img")
    labels = viewer.add_labels(np.stack([nuclei_2d[1][:128, :128], nuclei_2d[1][128:256, :128]]), name="gt")
    w = TrainingWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.image.value, w.labels.value = image, labels
    w.base.value = str(tiny_checkpoint)
    w.minutes.value = 10.0  # ample on a loaded machine: "steps at most" ends the runs
    return w


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_save_as_never_replaces_a_file_and_is_checked_before_training(trainer_widget, tiny_checkpoint, tmp_path):
    w = trainer_widget
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.zeros((8, 8), np.uint8))
    kept = {p: _digest(p) for p in (tiny_checkpoint, image)}
    for out, said in [(tiny_checkpoint, "exists and is kept"), (image, "a model is written as a .pth (or .pt) file"),
                      (tmp_path / "missing" / "m.pth", "does not exist")]:
        w.out.value = str(out)
        assert w.start() is None and said in w.status.value and not w.workers.busy
    assert {p: _digest(p) for p in kept} == kept
    w.viewer.layers.remove("gt")  # no Labels layer to learn from
    w.out.value = str(tmp_path / "new.pth")
    assert w.start() is None and w.status.value == "cannot train: pick an image layer and a Labels layer of its " \
        "annotations"


def test_stop_and_closing_save_what_was_learned_and_never_an_earlier_run(trainer_widget, tmp_path, qtbot):
    from napari_sam.core.models import load_model

    w = trainer_widget
    w.steps.value = 3
    w.out.value = str(tmp_path / "first.pth")
    w.start()
    qtbot.waitUntil(lambda: not w.workers.busy, timeout=120000)
    assert w.status.value.startswith("saved") and w.out.value.name == "first_2.pth"  # the next run saves beside it
    # a second run stopped at once: never the first run's model under the new name
    w.steps.value = 200
    w.start()
    w.workers.cancel()
    qtbot.waitUntil(lambda: not w.workers.busy, timeout=120000)
    second = tmp_path / "first_2.pth"
    if second.exists():
        assert load_model(second).metadata["training"]["steps"] < 3 and "stopped at step" in w.status.value
    else:
        assert w.status.value == "stopped before the first step: nothing was trained or saved"
    assert "step 3" not in w.status.value
    # closing the widget mid-run (napari's X, the viewer closing) saves what was learned so far
    w.out.value = str(tmp_path / "closed.pth")
    w.start()
    qtbot.waitUntil(lambda: bool(w.curve.series.get("loss")), timeout=120000)
    w.workers.close()
    qtbot.waitUntil(lambda: not w.workers.busy, timeout=120000)
    assert 1 <= load_model(tmp_path / "closed.pth").metadata["training"]["steps"] < 200


def test_a_run_is_saved_on_the_way_so_that_napari_killed_outright_keeps_it(trainer_widget, tmp_path, qtbot,
                                                                          monkeypatch):
    # napari killed mid-run (out of memory) used to lose the whole run: only Stop, closing
    # and the end saved it
    from napari_sam.core.models import load_model
    from napari_sam.train.checkpoints import optimizer_state_path

    monkeypatch.setattr("napari_sam.train.run.SAVE_EVERY", 2)
    w = trainer_widget
    w.steps.value = 200
    out = tmp_path / "on_the_way.pth"
    w.out.value = str(out)
    w.start()
    qtbot.waitUntil(lambda: len(w.curve.series.get("loss", [])) >= 5, timeout=120000)
    assert w.workers.busy and out.is_file() and optimizer_state_path(out).is_file()
    saved = load_model(out).metadata["training"]["steps"]
    assert saved >= 2 and saved % 2 == 0  # a save of the run in progress, resumable beside its optimizer state
    w.workers.cancel()
    qtbot.waitUntil(lambda: not w.workers.busy, timeout=120000)
    assert saved <= load_model(out).metadata["training"]["steps"] < 200
    # an error after a save on the way is said as an error, with what was learned saved
    from napari_sam.train import Trainer

    steps = Trainer.run

    def dies_after_five_steps(self):
        for record in steps(self):
            yield record
            if record.step == 5:
                raise RuntimeError("out of memory")

    monkeypatch.setattr(Trainer, "run", dies_after_five_steps)
    failed = tmp_path / "failed.pth"
    w.out.value = str(failed)
    w.start()
    qtbot.waitUntil(lambda: not w.workers.busy, timeout=120000)
    qtbot.wait(200)
    assert w.status.value == f"error: out of memory; what was learned is saved in {failed}"
    assert load_model(failed).metadata["training"]["steps"] == 5 and w.use.enabled


def test_an_rgb_image_is_read_as_chosen_and_the_trained_model_advises_that_reading(trainer_widget, tmp_path,
                                                                                    qtbot):
    from napari_sam.core.models import load_model

    w = trainer_widget
    assert w.rgb_reading.native.isHidden() and w.channel() is None  # a grey image has nothing to choose
    grey = w.image.value.data
    # H&E-like: dark purple nuclei on a pale pink ground
    stained = np.stack([255 - 0.6 * grey, 255 - 0.9 * grey, 255 - 0.3 * grey], axis=-1).clip(0, 255).astype(np.uint8)
    w.image.value = w.viewer.add_image(stained, name="stained", rgb=True)
    assert not w.rgb_reading.native.isHidden() and w.channel() is None  # the model's advice until asked otherwise
    w.rgb_reading.value = "haematoxylin stain"
    assert w.channel() == "haematoxylin"
    w.steps.value = 2
    w.out.value = str(tmp_path / "stain.pth")
    w.start()
    qtbot.waitUntil(lambda: not w.workers.busy, timeout=120000)
    assert w.status.value.startswith("saved"), w.status.value
    model = load_model(tmp_path / "stain.pth", device="cpu")
    assert model.metadata["stain"] == "haematoxylin"
    assert model.metadata["training"]["data"]["channel"] == "haematoxylin"
    # annotation with the trained model reads the image as the training did
    seg = w.use_model()
    qtbot.waitUntil(lambda: seg.session is not None, timeout=30000)
    assert seg.rgb_reading.value == "haematoxylin stain"
    assert seg.session.annotator.source.channel == "haematoxylin"
    qtbot.waitUntil(lambda: not seg.workers.busy, timeout=30000)
    w.rgb_reading.value = "colours"
    w.out.value = str(tmp_path / "colours.pth")
    w.start()
    qtbot.waitUntil(lambda: not w.workers.busy, timeout=120000)
    model = load_model(tmp_path / "colours.pth", device="cpu")
    assert "stain" not in model.metadata and model.metadata["training"]["data"]["channel"] == "rgb"


def test_an_instance_decoder_is_trained_saved_and_offered_for_segment_everything(trainer_widget, small_checkpoint,
                                                                                 tmp_path, qtbot, monkeypatch):
    import torch

    from napari_sam._qt.widget import CHECKPOINT
    from napari_sam.core.models import load_model

    w = trainer_widget
    w.base.value = CHECKPOINT
    w.checkpoint.value = small_checkpoint  # a 256-pixel input: a decoder trains in seconds
    w.mode.value = "instance-decoder"
    w.more.value = True  # the prompted training's settings are not this run's: only the seed is shown
    assert [name for name, s in w.settings.items() if not s.native.isHidden()] == ["seed"]
    w.steps.value = 4
    w.out.value = str(tmp_path / "ais.pth")
    w.start()
    qtbot.waitUntil(lambda: not w.workers.busy, timeout=120000)
    assert w.status.value.startswith(f"saved {tmp_path / 'ais.pth'}: the SAM with an instance decoder (the decoder "
                                     "of step"), w.status.value
    assert w.curve.series.get("validation loss") and len(w.curve.series["loss"]) == 4
    model = load_model(tmp_path / "ais.pth", device="cpu")
    base = load_model(small_checkpoint, device="cpu")
    assert model.instance_decoder is not None and model.metadata["automatic"]["mode"] == "ais"
    assert model.metadata["instance_decoder"]["steps"] == 4
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())  # the SAM unchanged
    assert not list(tmp_path.glob("*.instance_decoder_run"))  # the run's state went with it
    assert w.out.value.name == "ais_2.pth"
    seg = w.use_model()
    qtbot.waitUntil(lambda: seg.session is not None, timeout=30000)
    assert seg.everything_mode.value == "ais" and "apg" in [c for c in seg.everything_mode.choices]
    qtbot.waitUntil(lambda: not seg.workers.busy, timeout=30000)
    # stopped at once: nothing trained, nothing saved, nothing left
    w.steps.value = 500
    w.start()
    w.workers.cancel()
    qtbot.waitUntil(lambda: not w.workers.busy, timeout=120000)
    assert not (tmp_path / "ais_2.pth").exists() and "nothing was" in w.status.value
    assert not list(tmp_path.glob("*.instance_decoder_run"))
    # closed mid-run after a validation: the best decoder so far is saved
    w.curve.clear()
    w.steps.value = 30  # validating every 3 steps
    w.start()
    qtbot.waitUntil(lambda: bool(w.curve.series.get("validation loss")), timeout=120000)
    w.workers.close()
    qtbot.waitUntil(lambda: not w.workers.busy, timeout=120000)
    stopped = load_model(tmp_path / "ais_2.pth", device="cpu").metadata["instance_decoder"]
    assert 1 <= stopped["best_step"] <= stopped["steps"] < 30
    assert not list(tmp_path.glob("*.instance_decoder_run"))


def test_an_instance_decoder_run_left_by_napari_killed_continues_where_it_was(trainer_widget, small_checkpoint,
                                                                               tmp_path, qtbot):
    import shutil

    from napari_sam._qt.widget import CHECKPOINT
    from napari_sam.core.models import load_model

    w = trainer_widget
    w.base.value = CHECKPOINT
    w.checkpoint.value = small_checkpoint
    w.mode.value = "instance-decoder"
    w.steps.value = 30  # validating every 3 steps
    out = tmp_path / "ais.pth"
    state, crashed = tmp_path / "ais.pth.instance_decoder_run", tmp_path / "crashed"
    w.out.value = str(out)
    w.start()
    qtbot.waitUntil(lambda: len(w.curve.series.get("validation loss", [])) >= 2, timeout=120000)
    shutil.copytree(state, crashed)  # what napari killed at this moment leaves beside the file
    w.workers.cancel()
    qtbot.waitUntil(lambda: not w.workers.busy, timeout=120000)
    assert not state.exists()
    out.unlink()
    shutil.copytree(crashed, state)
    # the same file and settings: the run goes on from its last validation
    w.out.value = str(out)
    w.curve.clear()
    w.start()
    assert w.status.value.startswith(f"an instance decoder for {small_checkpoint}: continuing the stopped run in "
                                     f"{state}")
    qtbot.waitUntil(lambda: not w.workers.busy, timeout=120000)
    assert w.status.value.startswith(f"saved {out}") and not state.exists()
    assert load_model(out, device="cpu").metadata["instance_decoder"]["steps"] == 30
    assert w.curve.series["loss"][0][0] >= 4 and w.curve.series["loss"][-1][0] == 30  # not from the start
    # other settings into that file: said, and the run's state is left as it was
    out.unlink()
    shutil.copytree(crashed, state)
    w.out.value, w.settings["seed"].value = str(out), 1
    assert w.start() is None and not w.workers.busy
    assert w.status.value.startswith(f"cannot train: {state} holds a stopped run of other settings (seed 0): "
                                     "train with those to go on, or choose another name")
    assert sorted(p.name for p in state.iterdir()) == sorted(p.name for p in crashed.iterdir())
    (state / "run.json").write_text("[")  # a record of its settings that cannot be read
    assert w.start() is None and w.status.value.startswith(f"cannot train: {state / 'run.json'} cannot be read")
    (state / "run.json").unlink()
    assert w.start() is None and w.status.value == (f"cannot train: {state} holds a run's state without its settings: "
                                                    "choose another name to save as, or remove that folder")


def test_an_instance_decoder_run_that_fails_keeps_its_best_decoder_and_a_reading_it_cannot_learn_is_said(
        trainer_widget, small_checkpoint, tmp_path, qtbot, monkeypatch):
    from napari_sam._qt.widget import CHECKPOINT
    from napari_sam.core.models import load_model
    from napari_sam.model.checkpoint import read_checkpoint, write_checkpoint
    from napari_sam.train import instance_decoder

    w = trainer_widget
    w.base.value = CHECKPOINT
    w.checkpoint.value = small_checkpoint
    w.mode.value = "instance-decoder"
    w.steps.value = 30  # validating every 3 steps
    real, calls = instance_decoder._batch_loss, []

    def failing(*args, **kwargs):  # as torch fails: out of memory at the fifth step
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(instance_decoder, "_batch_loss", failing)
    w.out.value = str(tmp_path / "failed.pth")
    w.start()
    qtbot.waitUntil(lambda: not w.workers.busy, timeout=120000)
    assert w.status.value == f"error: out of memory; the best decoder so far is saved in {tmp_path / 'failed.pth'}"
    assert load_model(tmp_path / "failed.pth", device="cpu").metadata["instance_decoder"]["best_step"] == 3
    assert w.use.enabled and w.out.value.name == "failed_2.pth"
    assert not list(tmp_path.glob("*.instance_decoder_run"))
    monkeypatch.undo()
    from napari_sam.train.instance_decoder_run import InstanceDecoderRun

    # the file cannot be written at the end: said, with where the run's state waits
    def full_disk(self, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(InstanceDecoderRun, "save", full_disk)
    w.steps.value = 3
    w.start()
    qtbot.waitUntil(lambda: not w.workers.busy, timeout=120000)
    kept = list(tmp_path.glob("*.instance_decoder_run"))
    assert kept == [tmp_path / "failed_2.pth.instance_decoder_run"] and list(kept[0].glob("*.pt"))
    assert w.status.value == (f"error: [Errno 28] No space left on device; failed_2.pth was not saved ([Errno 28] "
                              f"No space left on device; the run's state is kept in {kept[0]})")
    monkeypatch.undo()
    # Train again into the same file continues that run (it had taken its steps: it saves);
    # Stop pressed while the finished run saves: superqt reports neither the result nor a stop
    saving = InstanceDecoderRun.save

    def stop_while_saving(self, *args):
        w.workers.cancel()
        return saving(self, *args)

    monkeypatch.setattr(InstanceDecoderRun, "save", stop_while_saving)
    w.start()
    qtbot.waitUntil(lambda: not w.workers.busy, timeout=120000)
    qtbot.waitUntil(lambda: w.status.value.startswith("saved"), timeout=10000)
    assert (tmp_path / "failed_2.pth").is_file() and w.out.value.name == "failed_2_2.pth"
    continued = load_model(tmp_path / "failed_2.pth", device="cpu").metadata["instance_decoder"]
    assert continued["steps"] == 3 and continued["best_step"] == 3 and "(the decoder of step 3" in w.status.value
    assert not kept[0].exists()  # the continued run is saved: its state goes
    monkeypatch.undo()
    # a model that reads stained RGB as its haematoxylin stain, asked to learn the colours
    checkpoint = read_checkpoint(small_checkpoint)
    write_checkpoint(tmp_path / "stain.pth", checkpoint.state_dict, dict(checkpoint.metadata, stain="haematoxylin"))
    w.checkpoint.value = tmp_path / "stain.pth"
    grey = w.image.value.data
    w.image.value = w.viewer.add_image(np.stack([grey, grey // 2, grey], axis=-1).astype(np.uint8), rgb=True)
    w.rgb_reading.value = "colours"
    w.out.value = str(tmp_path / "colours.pth")
    w.start()
    qtbot.waitUntil(lambda: not w.workers.busy, timeout=120000)
    assert w.status.value == ("error: the instance decoder reads the image as the model reads it (its haematoxylin "
                              "stain for stained RGB): choose \"model's advice\" under \"RGB read as\"")
    # no run folder made for it
    assert not (tmp_path / "colours.pth").exists() and not list(tmp_path.glob("*.instance_decoder_run"))
