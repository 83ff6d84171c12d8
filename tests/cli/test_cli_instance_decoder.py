"""`napari-sam train --mode instance-decoder`: an instance decoder for a model that has none,
its SAM weights untouched, and a stopped run saved and resumed."""

import contextlib
import threading

import numpy as np
import pytest
import tifffile
import torch

from napari_sam.cli import main


def test_a_model_without_one_gets_an_instance_decoder_and_keeps_its_sam(tmp_path, small_checkpoint, nuclei_2d,
                                                                        capsys, pairs_folder):
    from napari_sam.auto.recommend import recommended
    from napari_sam.core.models import load_model
    from napari_sam.train.instance_decoder_run import run_folder

    data = pairs_folder(tmp_path / "data")
    out = tmp_path / "ais.pth"
    args = ["train", str(data), "--model", str(small_checkpoint), "--out", str(out), "--device", "cpu",
            "--mode", "instance-decoder"]
    base = load_model(small_checkpoint)
    assert base.instance_decoder is None and recommended(base).mode != "ais"
    # the SAM's prompted-training settings are refused, before anything loads
    assert main(args + ["--box-noise", "0.1", "--mask-loss-upscale", "4"]) == 2
    err = capsys.readouterr().err
    assert "--box-noise, --mask-loss-upscale" in err and err.count("\n") == 1 and not out.exists()

    assert main(args + ["--steps", "12"]) == 0
    said = capsys.readouterr().out
    assert f"saved {out}" in said and "--mode ais" in said
    model = load_model(out)
    assert model.instance_decoder is not None and recommended(model).mode == "ais"
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())
    meta = model.metadata["instance_decoder"]
    assert meta["steps"] == 12 and meta["config"]["steps"] == 12 and meta["scale_matched"] is False
    assert not run_folder(out).exists()  # a finished run leaves nothing behind
    # an existing file is never replaced, and --resume of a finished run leaves it alone
    before = out.read_bytes()
    assert main(args + ["--steps", "12"]) == 2 and "pass --resume" in capsys.readouterr().err
    assert main(args + ["--steps", "12", "--resume"]) == 0 and "nothing to resume" in capsys.readouterr().out
    assert out.read_bytes() == before
    # and automatic segmentation runs with it
    labels = tmp_path / "labels.tif"
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, nuclei_2d[0][:128, :128])
    assert main(["segment", str(image), "--model", str(out), "--mode", "ais", "--out", str(labels),
                 "--device", "cpu"]) == 0
    assert tifffile.imread(labels).shape == (128, 128)


def test_a_stopped_run_is_saved_with_its_best_decoder_and_resumed(tmp_path, small_checkpoint, nuclei_2d, monkeypatch,
                                                                  capsys, pairs_folder):
    import napari_sam.cli.stopping as stopping
    from napari_sam.core.models import load_model
    from napari_sam.train.instance_decoder_run import run_folder

    data = pairs_folder(tmp_path / "data")
    out = tmp_path / "ais.pth"
    args = ["train", str(data), "--model", str(small_checkpoint), "--out", str(out), "--device", "cpu",
            "--mode", "instance-decoder", "--steps", "20"]

    class PressedAfter(threading.Event):
        """Ctrl-C, as the run sees it, after its seventh step: the run asks once per report,
        two of embedding (the training tiles, then the validation plane's) and one per step."""

        signum, asked = 2, 0

        def is_set(self):
            self.asked += 1
            return self.asked >= 9

    @contextlib.contextmanager
    def ctrl_c(message):
        yield PressedAfter()

    monkeypatch.setattr(stopping, "first_interrupt_stops", ctrl_c)
    assert main(args) == 130
    said = capsys.readouterr().out
    assert "stopped after step 7 of 20 (--resume continues it)" in said and "the decoder of step 6" in said
    stopped = load_model(out)
    assert stopped.instance_decoder is not None and stopped.metadata["instance_decoder"]["steps"] == 7
    assert run_folder(out).is_dir()
    assert main(args) == 2 and "pass --resume" in capsys.readouterr().err  # the saved file is kept
    # nor does a new run start over a stopped one whose file went
    out.unlink()
    assert main(args) == 2 and "holds a stopped run" in capsys.readouterr().err
    # stopped again while the resumed run embeds: still the decoder of step 6, said as such
    monkeypatch.setattr(stopping, "first_interrupt_stops", contextlib.contextmanager(
        lambda message: (yield type("Pressed", (threading.Event,), {"signum": 2, "is_set": lambda self: True})())))
    assert main(args + ["--resume"]) == 130
    said = capsys.readouterr().out
    assert "stopped after step 6 of 20" in said and "the decoder of step 6" in said
    assert load_model(out).metadata["instance_decoder"]["steps"] == 6
    monkeypatch.undo()
    # other settings for the stopped run are refused in one line, before any training
    assert main(args + ["--resume", "--learning-rate", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "--learning-rate 0.01 would change it" in err and err.count("\n") == 1
    # a record of its settings that cannot be read is said, not replaced by the options given
    record = run_folder(out) / "run.json"
    kept = record.read_bytes()
    record.write_text('{"model": ')
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{record} cannot be read" in err and err.count("\n") == 1 and record.read_text() == '{"model": '
    record.write_bytes(kept)
    from napari_sam.train import instance_decoder

    starts = []
    opened = instance_decoder.ResumableRun.__init__

    def noted(self, *a, **k):
        opened(self, *a, **k)
        starts.append(self.start)

    monkeypatch.setattr(instance_decoder.ResumableRun, "__init__", noted)
    assert main([a for a in args if a not in ("--steps", "20")] + ["--resume"]) == 0
    assert starts == [6]  # from the last validation before the stop, not from the start
    resumed = load_model(out)
    assert resumed.metadata["instance_decoder"]["steps"] == 20 and not run_folder(out).exists()
    assert any(not torch.equal(v, stopped.instance_decoder.state_dict()[k])
               for k, v in resumed.instance_decoder.state_dict().items())


def test_a_channel_the_model_reads_otherwise_is_refused(tmp_path, small_checkpoint, nuclei_2d, capsys):
    image, labels = nuclei_2d
    rgb = np.repeat(image[:128, :128, None], 3, axis=-1).astype(np.uint8)
    for d in ("images", "labels"):
        (tmp_path / "data" / d).mkdir(parents=True)
    tifffile.imwrite(tmp_path / "data" / "images" / "a.tif", rgb)
    tifffile.imwrite(tmp_path / "data" / "labels" / "a.tif", labels[:128, :128])
    out = tmp_path / "ais.pth"
    assert main(["train", str(tmp_path / "data"), "--model", str(small_checkpoint), "--out", str(out), "--device",
                 "cpu", "--mode", "instance-decoder", "--channel", "haematoxylin"]) == 2
    err = capsys.readouterr().err
    assert "reads the image as the model reads it" in err and not out.exists()


@pytest.mark.parametrize("option", [["--central-clicks", "0.5"]])
def test_each_prompted_training_setting_is_refused(tmp_path, small_checkpoint, nuclei_2d, option, capsys, pairs_folder):
    data = pairs_folder(tmp_path / "data", 1)
    assert main(["train", str(data), "--model", str(small_checkpoint), "--out", str(tmp_path / "a.pth"),
                 "--mode", "instance-decoder"] + option) == 2
    assert option[0] in capsys.readouterr().err


def test_a_stop_while_tiles_are_embedded_saves_nothing_and_leaves_nothing(tmp_path, small_checkpoint, nuclei_2d,
                                                                           monkeypatch, capsys, pairs_folder):
    import napari_sam.cli.stopping as stopping
    from napari_sam.train.instance_decoder_run import run_folder

    data = pairs_folder(tmp_path / "data")
    out = tmp_path / "ais.pth"

    class Pressed(threading.Event):
        signum = 15

        def is_set(self):
            return True

    monkeypatch.setattr(stopping, "first_interrupt_stops", contextlib.contextmanager(lambda message: (yield Pressed())))
    reports = []
    from napari_sam.train import instance_decoder

    real = instance_decoder.iter_train_instance_decoder

    def watched(*a, **k):
        for report in real(*a, **k):
            reports.append(report.stage)
            yield report

    monkeypatch.setattr(instance_decoder, "iter_train_instance_decoder", watched)
    assert main(["train", str(data), "--model", str(small_checkpoint), "--out", str(out), "--device", "cpu",
                 "--mode", "instance-decoder", "--steps", "20"]) == 143
    assert reports == ["embed"]  # stopped at its first report, not after embedding every tile
    assert "nothing was saved, nothing is left to resume" in capsys.readouterr().out
    assert not out.exists() and not run_folder(out).exists()


def test_a_model_with_a_decoder_gets_a_new_one_and_advice_for_it(tmp_path, small_checkpoint, nuclei_2d, pairs_folder):
    from napari_sam.auto.recommend import recommended
    from napari_sam.core.models import load_model
    from napari_sam.model.checkpoint import read_checkpoint, write_checkpoint
    from napari_sam.model.instance_decoder import InstanceDecoder, InstanceDecoderConfig

    old = InstanceDecoder(InstanceDecoderConfig(embed_dim=256, initial_features=4, scale=8))
    base = tmp_path / "with_decoder.pth"
    checkpoint = read_checkpoint(small_checkpoint)
    advice = {"mode": "boxes", "ais": {"foreground_threshold": 0.3}, "detector": "log"}
    write_checkpoint(base, checkpoint.state_dict, dict(checkpoint.metadata, automatic=advice,
                                                        instance_decoder={"scale_matched": True}),
                     extras={"decoder_state": old.state_dict()})
    data = pairs_folder(tmp_path / "data")
    out = tmp_path / "ais.pth"
    assert main(["train", str(data), "--model", str(base), "--out", str(out), "--device", "cpu",
                 "--mode", "instance-decoder", "--steps", "4"]) == 0
    model = load_model(out)
    assert model.metadata["automatic"] == {"mode": "ais", "detector": "log"}  # the old tuning went
    assert model.metadata["instance_decoder"]["scale_matched"] is False  # AIS reads it at the plane's own scale
    assert recommended(model).ais.foreground_threshold == 0.5  # micro-sam's
    assert model.instance_decoder.config.initial_features == 16  # a new decoder, not the old one trained on


def test_without_model_the_run_takes_the_one_the_environment_names(tmp_path, small_checkpoint, pairs_folder,
                                                                    monkeypatch):
    from napari_sam.core.models import load_model

    monkeypatch.setenv("NAPARI_SAM_MODEL", str(small_checkpoint))
    out = tmp_path / "ais.pth"
    assert main(["train", str(pairs_folder(tmp_path / "data", 2)), "--out", str(out), "--device", "cpu",
                 "--mode", "instance-decoder", "--steps", "2"]) == 0
    model = load_model(out)
    assert model.metadata["instance_decoder"]["model"] == str(small_checkpoint)
    small = load_model(small_checkpoint).state_dict()  # its SAM, not the shipped default's
    assert all(torch.equal(v, small[k]) for k, v in model.state_dict().items())


def test_a_time_limit_ends_the_run_once_it_has_a_decoder_to_save(tmp_path, small_checkpoint, pairs_folder, capsys):
    from napari_sam.core.models import load_model

    data = pairs_folder(tmp_path / "data")
    out = tmp_path / "ais.pth"
    # long past before the tiles are embedded: the run still reaches its first checkpoint (step 2)
    assert main(["train", str(data), "--model", str(small_checkpoint), "--out", str(out), "--device", "cpu",
                 "--mode", "instance-decoder", "--steps", "20", "--minutes", "0.00001"]) == 0
    assert "stopped after step 2 of 20 (--resume continues it)" in capsys.readouterr().out
    assert load_model(out).metadata["instance_decoder"]["steps"] == 2


def test_a_resumed_run_with_a_time_limit_goes_past_where_it_stood(tmp_path, small_checkpoint, pairs_folder, capsys):
    # it used to stop at once, the checkpoint it resumed from counting as its own: a job
    # resumed under a time limit would save step 2 for ever
    data = pairs_folder(tmp_path / "data")
    args = ["train", str(data), "--model", str(small_checkpoint), "--out", str(tmp_path / "ais.pth"), "--device",
            "cpu", "--mode", "instance-decoder", "--steps", "20", "--minutes", "0.00001"]
    assert main(args) == 0 and "stopped after step 2 of 20" in capsys.readouterr().out
    assert main(args + ["--resume"]) == 0 and "stopped after step 4 of 20" in capsys.readouterr().out
