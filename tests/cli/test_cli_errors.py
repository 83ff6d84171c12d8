"""One error path: every mistake in a request ends in one line naming it and exit status 2;
anything else is a bug, reported with its traceback, the version and exit status 1."""

import json
import os

import numpy as np
import pytest
import tifffile

from napari_sam.cli import main


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 1000, (64, 64)).astype(np.uint16)
    img[20:40, 20:40] += 3000
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "vol.tif", rng.integers(0, 255, (5, 64, 64), dtype=np.uint8),
                     photometric="minisblack")
    tifffile.imwrite(tmp_path / "rgb5.tif", rng.integers(0, 255, (64, 64, 5), dtype=np.uint8),
                     photometric="minisblack", planarconfig="contig")
    (tmp_path / "bad.json").write_text('[{"points": [[1, 2]]},\n {"points": [[3 4]]}]')
    (tmp_path / "notimage.tif").write_bytes(b"\x00\x13J\x86" + bytes(range(256)) * 4)
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(1).bytes(4096))
    return tmp_path


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["segment", "{d}/missing.tif", "--point", 3, 3], "no such image: {d}/missing.tif"),
        (["segment", "{d}/notimage.tif", "--point", 3, 3], "cannot read {d}/notimage.tif as a TIFF image"),
        (["segment", "{d}/vol.tif", "--point", 3, 3, "--plane", 200], "--plane 200 does not exist"),
        (["segment", "{d}/vol.tif", "--point", 3, 3, "--plane", 1, 2], "needs --plane with 1 index(es) (Z 0 to 4)"),
        (["segment", "{d}/rgb5.tif", "--point", 3, 3, "--channel", 7],
         "channel 7 does not exist; the image has 5 channels"),
        (["segment", "{d}/img.tif", "--point", 3, 3, "--channel", 0], "have no C axis"),
        (["segment", "{d}/img.tif", "--prompts", "{d}/missing.json"], "no such prompts file: {d}/missing.json"),
        (["segment", "{d}/img.tif", "--prompts", "{d}/bad.json"], "{d}/bad.json: malformed JSON at line 2, column 17"),
        (["segment", "{d}/img.tif", "--point", 500, 500], "1 point(s) lie outside the 64x64 image"),
        (["segment", "{d}/img.tif", "--box", 100, 100, 120, 120], "lie entirely outside the 64x64 image"),
        (["embed", "{d}/vol.tif", "--planes", 7, "--out", "{d}/c.zarr"], "--planes 7: the image has 5 plane(s)"),
        (["embed", "{d}/vol.tif", "--tile", 16, "--halo", 64, "--out", "{d}/c.zarr"],
         "--halo 64 is larger than --tile 16: each tile would embed more halo than interior"),
        (["segment", "{d}/img.tif", "--mode", "ais", "--point", 3, 3, "--box", 1, 1, 9, 9],
         "--mode ais segments every object of every plane, so --point, --box would be ignored"),
        (["segment", "{d}/vol.tif", "--mode", "boxes", "--plane", 1], "so --plane would be ignored"),
        (["segment", "{d}/img.tif", "--mode", "ais", "--points-per-side", 4],
         "--points-per-side sets the point grid of --mode auto, not of --mode ais"),
    ],
)
def test_mistakes_end_in_one_line_before_the_model_loads(files, monkeypatch, capsys, argv, expected):
    import napari_sam.core.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)
    argv = [a.format(d=files) if isinstance(a, str) else a for a in argv]
    out_args = [] if argv[0] == "embed" else ["--out", files / "o.tif"]
    rc, _, err = _run([*argv, "--model", "x.pth", *out_args], capsys)
    assert rc == 2
    assert err.startswith(f"napari-sam {argv[0]}: error: ") and err.count("\n") == 1, err
    assert expected.format(d=files) in err
    assert "Traceback" not in err and not (files / "o.tif").exists()


def test_halo_wider_than_the_default_tile_is_refused(files, tiny_checkpoint, capsys):
    rc, _, err = _run(["embed", files / "vol.tif", "--model", tiny_checkpoint, "--halo", 900,
                       "--out", files / "c.zarr"], capsys)
    assert rc == 2 and "--halo 900 is larger than the default tile 768" in err and not (files / "c.zarr").exists()
    rc, _, err = _run(["embed", files / "vol.tif", "--model", tiny_checkpoint, "--tile", 50,
                       "--out", files / "c.zarr"], capsys)
    assert rc == 2 and "--tile 50 is smaller than the default halo 128" in err and "--halo of at most 50" in err


def test_unknown_model_and_random_checkpoint(files, capsys):
    rc, _, err = _run(["segment", files / "img.tif", "--model", "vit_zz", "--point", 3, 3, "--out",
                       files / "o.tif"], capsys)
    assert rc == 2 and "Known model names: default, vit_b" in err
    rc, _, err = _run(["segment", files / "img.tif", "--model", files / "random.pth", "--point", 3, 3, "--out",
                       files / "o.tif"], capsys)
    assert rc == 2 and "neither a PyTorch archive nor a pickle" in err and "pickled Python objects" not in err
    rc, out, _ = _run(["models"], capsys)
    assert rc == 0 and out.splitlines()[0].startswith("default ") and "vit_b " in out
    rc, _, err = _run(["download", "vit_zz"], capsys)
    assert rc == 2 and "'default'" in err


@pytest.mark.parametrize("command, suffix", [("segment", ".npy"), ("embed", ".npy"), ("embed", ".zarr")])
def test_bool_images_are_taken_as_black_and_white(files, tiny_checkpoint, capsys, command, suffix):
    import zarr

    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    if suffix == ".npy":
        np.save(files / "mask.npy", mask)
    else:  # lazy: never read whole
        zarr.create_array(str(files / "mask.zarr"), shape=mask.shape, dtype=bool, chunks=(32, 32))[...] = mask
    argv = [command, files / f"mask{suffix}", "--model", tiny_checkpoint, "--dtype", "float32"]
    if command == "segment":
        argv += ["--point", 30, 30, "--out", files / "o.tif"]
    else:
        argv += ["--out", files / "c.zarr"]
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    if command == "segment":
        assert tifffile.imread(files / "o.tif").shape == (64, 64)
    else:
        assert "64x64 YX bool" in out and "1 tile(s) cached" in out


def test_only_objects_with_pixels_are_counted(files, tiny_checkpoint, monkeypatch, capsys):
    from napari_sam.core.embeddings import Embeddings

    original = Embeddings.segment
    calls = []

    class Empty:
        iou = 0.0

        def to_full(self, shape):
            return np.zeros(shape, bool)

    def second_is_empty(self, plane, prompt, *args, **kwargs):
        calls.append(prompt)
        return Empty() if len(calls) == 2 else original(self, plane, prompt, *args, **kwargs)

    monkeypatch.setattr(Embeddings, "segment", second_is_empty)
    rc, out, _ = _run(["segment", files / "img.tif", "--model", tiny_checkpoint, "--dtype", "float32",
                       "--box", 20, 20, 40, 40, "--box", 1, 1, 5, 5, "--out", files / "o.tif"], capsys)
    assert rc == 0
    assert "wrote 1 object(s)" in out and "prompt(s) 2 gave an empty mask" in out
    assert 2 not in tifffile.imread(files / "o.tif")


def test_a_bug_prints_its_traceback_the_version_and_exit_1(files, monkeypatch, capsys):
    import napari_sam
    from napari_sam.cli import registry

    def broken(args):
        raise RuntimeError("something inside went wrong")

    monkeypatch.setattr(registry, "models", broken)
    rc, _, err = _run(["models"], capsys)
    assert rc == 1
    assert "Traceback" in err and "RuntimeError: something inside went wrong" in err
    assert f"napari-sam {napari_sam.__version__}" in err and "please report it" in err


def test_malformed_prompt_objects_name_the_file(tmp_path):
    from napari_sam.core.prompts import load_prompts

    path = tmp_path / "p.json"
    path.write_text(json.dumps([[1, 2]]))
    with pytest.raises(ValueError, match=f"{path}: object 0 is a list"):
        load_prompts(path)
    path.write_text(json.dumps([{"points": "here"}]))
    with pytest.raises(ValueError, match=f"{path}: object 0"):
        load_prompts(path)


def test_download_fetches_a_micro_sam_models_decoder_file_too(capsys, monkeypatch, tmp_path):
    from napari_sam import weights

    monkeypatch.setattr(weights, "fetch_checkpoint", lambda name, *a, **k: tmp_path / f"{name}.pt")
    monkeypatch.setattr(weights, "fetch_decoder", lambda name, *a, **k: tmp_path / f"{name}_decoder.pt")
    rc, out, _ = _run(["download", "vit_b_lm"], capsys)
    assert rc == 0 and out.split() == [str(tmp_path / "vit_b_lm.pt"), str(tmp_path / "vit_b_lm_decoder.pt")]
    monkeypatch.setattr(weights, "fetch_decoder", lambda name, *a, **k: None)
    rc, out, _ = _run(["download", "vit_b"], capsys)
    assert rc == 0 and out.split() == [str(tmp_path / "vit_b.pt")]


def test_a_warning_is_one_line_of_the_commands_output(files, tiny_checkpoint, capsys):
    args = ["embed", files / "vol.tif", "--model", tiny_checkpoint, "--out", files / "c.zarr", "--planes", 0]
    assert _run(args, capsys)[0] == 0
    rc, _, err = _run([*args, "--storage", "float16"], capsys)  # the cache holds float32 embeddings
    lines = [line for line in err.splitlines() if "warning" in line]
    assert rc == 0 and len(lines) == 1 and lines[0].startswith("napari-sam embed: warning: the embedding cache"), err
    assert "--on-mismatch replace" in lines[0] and "UserWarning" not in err


@pytest.mark.parametrize("minutes", ["0", "-1", "nan", "ten"])
def test_train_minutes_must_be_positive_before_anything_is_read(files, minutes, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", str(files / "nothing"), "--minutes", minutes, "--out", str(files / "m.pth")])
    assert info.value.code == 2 and "--minutes" in capsys.readouterr().err and not (files / "m.pth").exists()


@pytest.mark.parametrize("option, value, said", [("--min-area", "-5", "-5 is negative"),
                                                 ("--points-per-side", "0", "0 is not a positive number")])
def test_automatic_mode_sizes_are_checked_when_parsed(files, option, value, said, capsys):
    with pytest.raises(SystemExit) as info:
        main(["segment", str(files / "img.tif"), "--mode", "auto", option, value, "--out", str(files / "o.tif")])
    assert info.value.code == 2 and f"argument {option}: {said}" in capsys.readouterr().err
    assert not (files / "o.tif").exists()


def test_box_noise_is_a_fraction_of_the_box():
    from napari_sam.train import TrainingConfig

    assert TrainingConfig(box_noise=1.0).box_noise == 1.0
    with pytest.raises(ValueError, match="box_noise must lie in \\[0, 1\\], got 5"):
        TrainingConfig(box_noise=5)


def test_auto_on_volumes_alone_is_refused_rather_than_skipped(tmp_path, tiny_checkpoint, capsys):
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    labels = np.zeros((3, 32, 32), np.uint16)
    labels[:, 8:20, 8:20] = 1
    tifffile.imwrite(tmp_path / "images" / "v.tif", (labels * 200).astype(np.uint8))
    tifffile.imwrite(tmp_path / "labels" / "v.tif", labels)
    rc, out, err = _run(["evaluate", tmp_path, "--model", tiny_checkpoint, "--auto", "--max-objects", 1], capsys)
    assert rc == 2 and "--auto scores 2D label images; the 1 3D volume(s)" in err and "Propagation" not in out


def test_version_and_annotate_without_a_display_are_one_line(monkeypatch, capsys):
    from napari_sam import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"napari-sam {__version__}"
    pytest.importorskip("napari")
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    rc, _, err = _run(["annotate", "--sample", "nuclei_2d"], capsys)  # Qt would abort the process
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("napari-sam annotate: error: no display to open napari on")


def test_output_read_by_a_reader_that_leaves_is_no_internal_error(tmp_path, nuclei_2d):
    # `napari-sam models | head -1` ended in a traceback and "this is a bug", and a segment
    # whose log was cut short never wrote the file it was asked for
    import subprocess
    import sys

    run = subprocess.Popen([sys.executable, "-m", "napari_sam.cli", "models"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    run.stdout.close()  # the reader is gone before the first line
    err = run.stderr.read().decode()
    assert run.wait() == 0 and err == ""
    tifffile.imwrite(tmp_path / "a.tif", nuclei_2d[0][:128, :128])
    run = subprocess.Popen([sys.executable, "-m", "napari_sam.cli", "segment", str(tmp_path / "a.tif"), "--box",
                            "10", "10", "60", "60", "--out", str(tmp_path / "lab.tif")], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    run.stdout.close()
    err = run.stderr.read().decode()
    assert run.wait() == 0 and "Traceback" not in err
    assert tifffile.imread(tmp_path / "lab.tif").max() == 1


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_time_limit_or_a_closed_terminal_stops_embed_cleanly(tmp_path, signame):
    # a cluster's SIGTERM used to kill the command mid-bar, leaving claims that held the
    # tiles from writers on other hosts for 15 minutes
    import signal
    import subprocess
    import sys
    import time

    volume = np.random.default_rng(0).integers(0, 255, (400, 64, 64), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "v.tif", volume, imagej=True, metadata={"axes": "ZYX"})
    cache = tmp_path / "c.zarr"
    run = subprocess.Popen([sys.executable, "-m", "napari_sam.cli", "embed", str(tmp_path / "v.tif"), "--out",
                            str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(cache.glob("*/checksums/c/*")):  # a tile is stored
        time.sleep(0.2)
    run.send_signal(getattr(signal, signame))
    out, err = run.communicate(timeout=60)
    assert run.returncode == 128 + getattr(signal, signame), err.decode()[-500:]
    assert err.decode().strip().splitlines()[-1] == f"napari-sam embed: stopped by {signame}; what was finished is kept"
    assert not [p for p in cache.glob("*/checksums/claims/*")]  # no claim left behind


def test_a_stop_that_catches_an_asynchronous_write_half_made_still_ends_with_its_line(tmp_path):
    # zarr writes through coroutines; a SIGTERM between making one and running it left Python
    # to say "coroutine ... was never awaited" at exit, after the line that tells how it ended
    import subprocess
    import sys

    script = (
        "import os, signal, sys\n"
        "from napari_sam import cli\n"
        "from napari_sam.cli import cache\n"
        "async def write(): pass\n"
        "def store(coroutine):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return coroutine\n"
        "def embed(args):\n"
        "    store(write())\n"
        "cache.embed = embed\n"
        "sys.exit(cli.main(['embed', 'v.tif']))\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 143, run.stderr[-500:]
    assert run.stderr.strip().splitlines() == ["napari-sam embed: stopped by SIGTERM; what was finished is kept"]


def test_a_stop_while_zarr_still_writes_lets_the_write_end_before_its_line(tmp_path):
    # a SIGTERM while zarr's own thread ran a write left that task pending; zarr stops its loop
    # at exit, and asyncio said "Task was destroyed but it is pending!" after our last line
    import subprocess
    import sys

    script = (
        "import asyncio, os, signal, sys\n"
        "from napari_sam import cli\n"
        "from napari_sam.cli import cache\n"
        "from zarr.core import sync\n"
        "done = []\n"
        "async def write():\n"
        "    await asyncio.sleep(0.5)\n"
        "    done.append(True)\n"
        "def embed(args):\n"
        "    asyncio.run_coroutine_threadsafe(write(), sync._get_loop())\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "cache.embed = embed\n"
        "code = cli.main(['embed', 'v.tif'])\n"
        "print('written' if done else 'lost')\n"
        "sys.exit(code)\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 143, run.stderr[-500:]
    assert run.stderr.strip().splitlines() == ["napari-sam embed: stopped by SIGTERM; what was finished is kept"]
    assert run.stdout.strip() == "written"


def test_a_plane_option_left_empty_by_the_shell_is_refused(capsys):
    # `--planes $PLANES` with PLANES unset used to embed nothing and exit 0
    for args in (["embed", "x.tif", "--planes"], ["segment", "x.tif", "--plane", "--point", "1", "1"]):
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 2 and "expected at least one argument" in capsys.readouterr().err


def test_a_model_named_by_the_environment_is_said_to_come_from_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NAPARI_SAM_MODEL", "bogus")
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((32, 32), np.uint8))
    assert main(["segment", str(tmp_path / "a.tif"), "--point", "5", "5", "--out", str(tmp_path / "l.tif")]) == 2
    assert "error: $NAPARI_SAM_MODEL=bogus: 'bogus' is neither a model name" in capsys.readouterr().err


def test_a_closed_stdout_is_no_internal_error(monkeypatch, capsys):
    # `napari-sam caches >&-`: Python's stdout is None, and print() writes nothing
    monkeypatch.setattr("sys.stdout", None)
    assert main(["models"]) == 0
