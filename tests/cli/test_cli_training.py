"""`napari-sam train` and `evaluate` with odd input, interruptions and resumed runs."""

import numpy as np
import pytest
import tifffile

from napari_sam.cli import main


def _pair(folder, nuclei_2d):
    image, labels = nuclei_2d
    tifffile.imwrite(folder / "img.tif", np.stack([image[:128, :128], image[128:256, 128:256]]))
    tifffile.imwrite(folder / "lab.tif", np.stack([labels[:128, :128], labels[128:256, 128:256]]))
    return ["train", str(folder / "img.tif"), "--labels", str(folder / "lab.tif"), "--device", "cpu"]


def test_a_run_that_dies_can_resume_from_its_last_save(tmp_path, tiny_checkpoint, nuclei_2d, monkeypatch):
    from napari_sam.core.models import load_model
    from napari_sam.train import Trainer

    run = Trainer.run

    def dies_after_three_steps(self):
        for record in run(self):
            yield record
            if record.step == 3:
                raise MemoryError("the machine ran out of memory")

    monkeypatch.setattr("napari_sam.train.run.SAVE_EVERY", 2)
    monkeypatch.setattr(Trainer, "run", dies_after_three_steps)
    out = tmp_path / "tuned.pth"
    args = _pair(tmp_path, nuclei_2d) + ["--model", str(tiny_checkpoint), "--out", str(out), "--steps", "6"]
    assert main(args) == 1
    assert load_model(out).metadata["training"]["steps"] == 2  # the save of step 2 is there to resume from
    monkeypatch.setattr(Trainer, "run", run)
    assert main([a for a in args if a not in ("--model", str(tiny_checkpoint))] + ["--resume"]) == 0
    assert load_model(out).metadata["training"]["steps"] == 6


def test_a_resumed_run_refuses_other_settings(tmp_path, tiny_checkpoint, nuclei_2d, capsys):
    out = tmp_path / "tuned.pth"
    args = _pair(tmp_path, nuclei_2d) + ["--out", str(out)]
    assert main(args + ["--model", str(tiny_checkpoint), "--steps", "1"]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main(args + ["--steps", "2", "--resume", "--mode", "full", "--learning-rate", "0.01",
                        "--mask-loss-upscale", "4"]) == 2
    err = capsys.readouterr().err
    assert "--mode full" in err and "--learning-rate 0.01" in err and "--mask-loss-upscale 4" in err
    assert err.count("\n") == 1
    assert out.read_bytes() == before
    # the same command again, --model and all, continues it
    assert main(args + ["--model", str(tiny_checkpoint), "--steps", "2", "--resume", "--mode", "decoder"]) == 0
    assert "is not read" in capsys.readouterr().out


def test_train_takes_no_encoder_precision_and_a_short_run_leaves_its_warm_up(tmp_path, tiny_checkpoint, nuclei_2d,
                                                                           capsys):
    from napari_sam.core.models import load_model

    args = _pair(tmp_path, nuclei_2d) + ["--model", str(tiny_checkpoint)]
    with pytest.raises(SystemExit) as refused:  # argparse's own refusal of an unknown option
        main(args + ["--out", str(tmp_path / "a.pth"), "--steps", "1", "--dtype", "foo"])
    assert refused.value.code == 2 and "unrecognized arguments: --dtype foo" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "b.pth"), "--steps", "20"]) == 0
    assert load_model(tmp_path / "b.pth").metadata["training"]["settings"]["warmup_steps"] == 2


def test_a_mistyped_device_is_one_line(tmp_path, nuclei_2d, capsys, pairs_folder):
    folder = pairs_folder(tmp_path / "data", 1)
    assert main(["evaluate", str(folder), "--model", "default", "--device", "gpu", "--corrections", "0"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'gpu'" in err and err.count("\n") == 1


def test_a_full_fine_tune_keeps_the_advice_that_needs_no_decoder(tmp_path, nuclei_2d):
    from napari_sam.core.models import load_model

    out = tmp_path / "full.pth"
    assert main(_pair(tmp_path, nuclei_2d) + ["--model", "default", "--out", str(out), "--steps", "1",
                                              "--mode", "full"]) == 0
    model = load_model(out, device="cpu", dtype="float32")
    assert model.instance_decoder is None
    assert model.metadata["automatic"] == {"mode": "boxes", "detector": "log",
                                           "grid": {"pred_iou_thresh": 0.6, "stability_thresh": 0.8}}


def test_hidden_files_and_checkpoints_beside_the_images_are_not_pairs(tmp_path, nuclei_2d, pairs_folder):
    from napari_sam.core.pairs import pair_files

    folder = pairs_folder(tmp_path / "data", 2)
    for d in ("images", "labels"):
        (folder / d / "._p0.tif").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / "images" / "p0.tif.pth").write_bytes(b"a checkpoint")
    assert [p.name for p, _ in pair_files(folder)] == ["p0.tif", "p1.tif"]


def test_labels_that_are_a_colour_image_or_a_mask_are_named(tmp_path, nuclei_2d, pairs_folder):
    from napari_sam.core.pairs import check_pair
    from napari_sam.train import SegmentationDataset

    image, labels = nuclei_2d
    rgb = np.repeat(image[:128, :128, None], 3, axis=2).astype(np.uint8)
    with pytest.raises(ValueError, match="look like a colour image"):
        check_pair(rgb, np.repeat(labels[:128, :128, None], 3, axis=2).astype(np.uint8), "a.tif")
    with pytest.warns(UserWarning, match=r"one id \(255\) in \d+ separate pieces"):
        check_pair(image, np.where(labels > 0, 255, 0).astype(np.uint8), "mask.tif")
    folder = pairs_folder(tmp_path / "data", 2)
    tifffile.imwrite(folder / "labels" / "p1.tif", np.repeat(labels[:128, :128, None], 3, axis=2).astype(np.uint8))
    with pytest.raises(ValueError, match="p1.tif: the labels .* look like a colour image"):
        SegmentationDataset.from_folder(folder)


def test_a_label_file_without_objects_is_left_out_with_a_warning(tmp_path, nuclei_2d, pairs_folder):
    from napari_sam.train import SegmentationDataset

    folder = pairs_folder(tmp_path / "data", 3)
    tifffile.imwrite(folder / "labels" / "p1.tif", np.zeros((128, 128), np.uint16))
    with pytest.warns(UserWarning, match="1 label file.* hold no object and are left out: p1.tif"):
        data = SegmentationDataset.from_folder(folder)
    assert data.names == ["p0.tif", "p2.tif"]


def test_a_json_target_that_is_a_folder_is_refused_before_the_work(tmp_path, nuclei_2d, capsys, pairs_folder):
    folder = pairs_folder(tmp_path / "data", 1)
    (tmp_path / "r.json").mkdir()
    assert main(["evaluate", str(folder), "--model", "no-such-model.pth", "--json", str(tmp_path / "r.json"),
                 "--overwrite"]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_labels_without_objects_are_said_to_be_empty(tmp_path, tiny_checkpoint, capsys):
    for d in ("images", "labels"):
        (tmp_path / d).mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", np.zeros((64, 64), np.uint8))
    tifffile.imwrite(tmp_path / "labels" / "a.tif", np.zeros((64, 64), np.uint16))
    assert main(["evaluate", str(tmp_path), "--model", str(tiny_checkpoint), "--corrections", "0"]) == 0
    assert "no object was measured" in capsys.readouterr().err


def test_one_image_without_its_labels_is_told_to_give_them(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((64, 64), np.uint8))
    assert main(["train", str(tmp_path / "a.tif"), "--out", str(tmp_path / "m.pth")]) == 2
    assert "give its labels with --labels" in capsys.readouterr().err


def test_train_and_evaluate_take_one_channel_of_a_multichannel_image(tmp_path, tiny_checkpoint, nuclei_2d, capsys):
    image, labels = nuclei_2d
    for d in ("images", "labels"):
        (tmp_path / d).mkdir()
    for i in range(2):
        nuclei = image[i * 128:(i + 1) * 128, :128]
        two = np.stack([nuclei, nuclei[::-1]], -1)  # channel 1: something else
        tifffile.imwrite(tmp_path / "images" / f"p{i}.tif", two, photometric="minisblack", planarconfig="contig")
        tifffile.imwrite(tmp_path / "labels" / f"p{i}.tif", labels[i * 128:(i + 1) * 128, :128])
    model = ["--model", str(tiny_checkpoint), "--device", "cpu"]
    assert main(["evaluate", str(tmp_path), *model, "--corrections", "0"]) == 2
    assert "2 channels" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), *model, "--corrections", "0", "--channel", "2"]) == 2
    assert "--channel 2 does not exist" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), *model, "--corrections", "0", "--channel", "0"]) == 0
    assert main(["train", str(tmp_path), *model, "--channel", "0", "--steps", "1", "--out",
                 str(tmp_path / "m.pth")]) == 0
    from napari_sam.model.checkpoint import read_checkpoint

    assert read_checkpoint(tmp_path / "m.pth").metadata["training"]["data"]["channel"] == 0
    capsys.readouterr()
    assert main(["train", str(tmp_path), "--device", "cpu", "--channel", "1", "--steps", "2", "--resume", "--out",
                 str(tmp_path / "m.pth")]) == 2
    assert "learned from --channel 0" in capsys.readouterr().err


def _stained_folder(root, nuclei_2d):
    """Two H&E-like RGB tiles: purple nuclei on a pale pink ground, as brightfield looks."""
    image, labels = nuclei_2d
    for d in ("images", "labels"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        lab = labels[i * 128:(i + 1) * 128, :128]
        rgb = np.where(lab[..., None] > 0, [95, 60, 140], [236, 214, 226]) + rng.normal(0, 6, lab.shape + (3,))
        tifffile.imwrite(root / "images" / f"he{i}.tif", np.clip(rgb, 0, 255).astype(np.uint8), photometric="rgb")
        tifffile.imwrite(root / "labels" / f"he{i}.tif", lab)
    return root


def test_evaluate_and_train_read_rgb_as_the_colours_or_the_stain_when_named(tmp_path, tiny_sam, nuclei_2d, capsys,
                                                                            monkeypatch, pairs_folder):
    import json

    from napari_sam.core.embeddings import Embeddings
    from napari_sam.model.checkpoint import read_checkpoint, write_checkpoint

    read = []
    init = Embeddings.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        read.append(self.source.channel)

    monkeypatch.setattr(Embeddings, "__init__", spy)
    folder = _stained_folder(tmp_path / "he", nuclei_2d)
    scores = {}
    for channel in ("rgb", "haematoxylin"):
        out = tmp_path / f"{channel}.json"
        read.clear()
        assert main(["evaluate", str(folder), "--model", "default", "--device", "cpu", "--corrections", "0",
                     "--max-objects", "4", "--channel", channel, "--json", str(out)]) == 0
        assert read and set(read) == {channel}  # every plane read as asked
        scores[channel] = json.loads(out.read_text())[0]["point"]
    assert scores["rgb"] != scores["haematoxylin"]
    grey = tmp_path / "grey"
    pairs_folder(grey, 1)
    assert main(["evaluate", str(grey), "--model", "default", "--channel", "rgb", "--corrections", "0"]) == 2
    assert "--channel rgb reads RGB images" in capsys.readouterr().err
    assert main(["evaluate", str(folder), "--channel", "rgb"]) == 2  # the baseline alone has its own reading
    assert "says how a model reads RGB: give --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", str(folder), "--channel", "-1"])
    assert "0 or more" in capsys.readouterr().err
    # checked before the model loads
    assert main(["train", str(grey), "--model", "no-such-model", "--channel", "haematoxylin", "--steps", "1",
                 "--out", str(tmp_path / "x.pth")]) == 2
    assert "--channel haematoxylin reads RGB images; p0.tif has shape (128, 128)" in capsys.readouterr().err
    # a fine-tune that reads stained planes otherwise leaves out the heads that learned the other reading
    assert main(["train", str(folder), "--model", "default", "--device", "cpu", "--steps", "1", "--channel", "rgb",
                 "--out", str(tmp_path / "colours.pth")]) == 0
    assert "the instance decoder and the mask refiner left out" in capsys.readouterr().out
    saved = read_checkpoint(tmp_path / "colours.pth")
    assert "stain" not in saved.metadata and set(saved.extras) == set()
    assert main(["train", str(folder), "--model", "default", "--device", "cpu", "--steps", "1",
                 "--out", str(tmp_path / "stain.pth")]) == 0
    assert {"decoder_state", "mask_refiner_state"} <= set(read_checkpoint(tmp_path / "stain.pth").extras)

    # what a fine-tune learned to read is what its model asks for: the colours drop the
    # base model's stain advice, the stain gives it to a model that had none
    advised = tmp_path / "advised.pth"
    write_checkpoint(advised, tiny_sam.state_dict(), {"stain": "haematoxylin"})
    for base, channel, stain in ((advised, "rgb", None), (advised, None, "haematoxylin"),
                                 (tmp_path / "plain.pth", "haematoxylin", "haematoxylin")):
        if not base.exists():
            write_checkpoint(base, tiny_sam.state_dict(), {})
        out = tmp_path / f"ft-{base.stem}-{channel}.pth"
        given = [] if channel is None else ["--channel", channel]
        assert main(["train", str(folder), "--model", str(base), "--device", "cpu", "--steps", "1", *given,
                     "--out", str(out)]) == 0
        meta = read_checkpoint(out).metadata
        assert meta.get("stain") == stain and meta["training"]["data"].get("channel") == channel
    capsys.readouterr()


def test_channels_first_images_are_named_as_such(nuclei_2d):
    from napari_sam.core.pairs import check_pair

    image, labels = nuclei_2d
    with pytest.raises(ValueError, match=r"channels first\? images are read with their channels last"):
        check_pair(np.stack([image, image]), labels, "cyx.tif")


def test_an_ignored_hang_up_stays_ignored_under_nohup():
    import signal

    from napari_sam.cli.stopping import first_interrupt_stops

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup starts a command
    try:
        with first_interrupt_stops("stopping"):
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # a time limit still saves
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_resumed_run_validates_on_the_split_it_started_with(tmp_path, tiny_checkpoint, nuclei_2d, pairs_folder):
    from napari_sam.model.checkpoint import read_checkpoint

    folder = pairs_folder(tmp_path / "data", 4)
    out = tmp_path / "m.pth"
    args = ["train", str(folder), "--device", "cpu", "--out", str(out)]
    assert main(args + ["--model", str(tiny_checkpoint), "--steps", "1", "--seed", "5"]) == 0
    first = read_checkpoint(out).metadata["training"]["validation_data"]
    assert main(args + ["--steps", "2", "--resume"]) == 0
    assert read_checkpoint(out).metadata["training"]["validation_data"] == first


def test_png_and_npy_pairs_train_and_evaluate_as_tiffs_do(tmp_path, nuclei_2d, capsys):
    # DSB2018 and many exports come as PNG; evaluation and training read the same formats
    from PIL import Image
    from skimage.io import imsave

    from napari_sam.evaluate import load_pairs
    from napari_sam.train import SegmentationDataset

    image, labels = nuclei_2d
    root = tmp_path / "data"
    for d in ("images", "labels"):
        (root / d).mkdir(parents=True)
    imsave(root / "images" / "a.png", image[:128, :128], check_contrast=False)
    assert labels[:128, :128].max() < 256
    indexed = Image.fromarray(labels[:128, :128].astype(np.uint8), mode="P")  # as label tools save them
    indexed.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
    indexed.save(root / "labels" / "a.png")
    np.save(root / "images" / "b.npy", image[128:256, :128])
    np.save(root / "labels" / "b.npy", labels[128:256, :128])
    data = SegmentationDataset.from_folder(root)
    assert data.names == ["a.png", "b.npy"]
    np.testing.assert_array_equal(data[0].labels, labels[:128, :128])
    np.testing.assert_array_equal(data[1].image, image[128:256, :128])
    assert [p.name for p in load_pairs(root)] == ["a", "b"]
    assert main(["evaluate", str(root), "--max-objects", "3"]) == 0
    assert "| watershed baseline | 2 | 6 |" in capsys.readouterr().out  # both images, three objects each


def test_previews_beside_the_images_are_left_out_with_pattern(tmp_path, tiny_checkpoint, nuclei_2d, capsys,
                                                               pairs_folder):
    # the error names the previews and the option; the option then takes the labelled files only
    root = pairs_folder(tmp_path / "data", 2)
    np.save(root / "images" / "p0_preview.npy", np.zeros((16, 16), np.uint8))
    assert main(["evaluate", str(root), "--max-objects", "2"]) == 2
    err = capsys.readouterr().err
    assert "p0_preview.npy (only the .tif files have labels" in err and "--pattern '*.tif'" in err
    assert main(["evaluate", str(root), "--max-objects", "2", "--pattern", "*.tif"]) == 0
    assert "| watershed baseline | 2 | 4 |" in capsys.readouterr().out  # both images, two objects each
    out = tmp_path / "ft.pth"
    assert main(["train", str(root), "--model", str(tiny_checkpoint), "--device", "cpu", "--steps", "1",
                 "--pattern", "*.tif", "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["evaluate", str(root), "--pattern", "*.png"]) == 2
    assert "no image files (TIFF, PNG, JPEG or .npy) matching '*.png'" in capsys.readouterr().err
