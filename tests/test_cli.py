import json

import numpy as np
import pytest
import tifffile

from napari_sam.cli import main


@pytest.fixture()
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 1000, (120, 160)).astype(np.uint16)
    img[30:60, 40:80] += 3000  # a bright object
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, img)
    return path


def test_segment_writes_one_object_per_box(tmp_path, image_file, tiny_checkpoint, capsys):
    out = tmp_path / "labels.tif"
    rc = main(
        ["segment", str(image_file), "--model", str(tiny_checkpoint), "--dtype", "float32",
         "--box", "40", "30", "80", "60", "--box", "100", "70", "150", "110", "--out", str(out)]
    )
    assert rc == 0
    labels = tifffile.imread(out)
    assert labels.shape == (120, 160) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert "wrote 2 object(s)" in capsys.readouterr().out


def test_segment_from_prompts_file_to_zarr(tmp_path, image_file, tiny_checkpoint):
    import zarr

    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"points": [[60, 45]]}, {"points": [[120, 90], [10, 10]], "labels": [1, 0]}]))
    out = tmp_path / "labels.zarr"
    assert main(["segment", str(image_file), "--model", str(tiny_checkpoint), "--prompts", str(prompts),
                 "--out", str(out)]) == 0
    arr = zarr.open_array(str(out), mode="r")
    assert arr.shape == (120, 160) and arr.metadata.zarr_format == 3
    assert np.asarray(arr).max() <= 2


def test_existing_output_is_not_overwritten(tmp_path, image_file, tiny_checkpoint, capsys):
    out = tmp_path / "labels.tif"
    tifffile.imwrite(out, np.full((2, 2), 7, np.uint8))
    rc = main(["segment", str(image_file), "--model", str(tiny_checkpoint), "--point", "60", "45", "--out", str(out)])
    assert rc == 2
    assert "exists" in capsys.readouterr().err
    assert (tifffile.imread(out) == 7).all()


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "no prompts"),
        (["--point", "500", "10"], "outside"),
        (["--box", "0", "0", "10", "10", "--box", "5", "5", "20", "20", "--point", "3", "3"], "single --box"),
    ],
)
def test_bad_prompts(tmp_path, image_file, tiny_checkpoint, capsys, extra, message):
    rc = main(["segment", str(image_file), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o.tif"), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.tif").exists()


def test_volume_needs_a_plane(tmp_path, tiny_checkpoint, capsys):
    vol = tmp_path / "vol.tif"
    tifffile.imwrite(vol, np.zeros((5, 64, 64), np.uint8))
    out = tmp_path / "o.tif"
    assert main(["segment", str(vol), "--model", str(tiny_checkpoint), "--point", "3", "3", "--out", str(out)]) == 2
    assert "--plane" in capsys.readouterr().err
    assert main(["segment", str(vol), "--model", str(tiny_checkpoint), "--point", "3", "3", "--plane", "2",
                 "--out", str(out)]) == 0
    assert tifffile.imread(out).shape == (64, 64)


def test_unknown_model_names_the_choices(tmp_path, image_file, capsys):
    rc = main(["segment", str(image_file), "--model", "vit_zz", "--point", "3", "3", "--out", str(tmp_path / "o.tif")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "vit_zz" in err and "vit_b" in err


def test_embed_then_info_then_resume(tmp_path, tiny_checkpoint, nuclei_3d, capsys):
    import zarr

    vol = tmp_path / "vol.zarr"
    z = zarr.create_array(str(vol), shape=(3, 100, 100), dtype="uint8", chunks=(1, 50, 50), zarr_format=2)
    z[...] = nuclei_3d[0][:3]
    cache = tmp_path / "cache.zarr"
    args = ["embed", str(vol), "--model", str(tiny_checkpoint), "--dtype", "float32", "--tile", "40", "--halo", "8",
            "--out", str(cache)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3x100x100 ZYX uint8" in out and "3x3 tile(s) per plane" in out and "27 tile(s) cached" in out
    assert main(["info", str(cache)]) == 0
    info = capsys.readouterr().out
    assert "27/27 present" in info and "tile 40 + halo 8" in info and "tiny_sam.pth" in info
    features = np.asarray(zarr.open_group(str(cache), mode="r")[info.split("]")[0].lstrip("[")]["features"][...])
    assert features.shape == (3, 3, 3, 256, 64, 64) and np.abs(features).sum(axis=(3, 4, 5)).min() > 0
    assert main(args) == 0  # nothing left to do
    assert "27 tile(s) cached" in capsys.readouterr().out


def test_embed_refuses_bad_requests(tmp_path, tiny_checkpoint, nuclei_3d, capsys):
    import tifffile

    path = tmp_path / "vol.tif"
    tifffile.imwrite(path, nuclei_3d[0][:2])
    assert main(["embed", str(tmp_path / "missing.tif"), "--model", str(tiny_checkpoint)]) == 2
    assert "no such image" in capsys.readouterr().err
    assert main(["embed", str(path), "--model", str(tiny_checkpoint), "--axes", "YX"]) == 2
    assert "name 2 axes" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not an embedding cache")
    assert main(["embed", str(path), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "notes")]) == 2
    assert "not a Zarr v3 store" in capsys.readouterr().err
    assert main(["embed", str(path), "--model", str(tiny_checkpoint), "--tile", "32", "--halo", "4",
                 "--out", str(tmp_path / "c.zarr")]) == 0
    capsys.readouterr()
    assert main(["embed", str(path), "--model", str(tiny_checkpoint), "--tile", "50", "--halo", "4",
                 "--out", str(tmp_path / "c.zarr"), "--on-mismatch", "error"]) == 2
    assert "tile: 32 (cache) vs 50 (request)" in capsys.readouterr().err


def test_propagate_writes_a_new_file_and_keeps_the_seeds(tmp_path, tiny_checkpoint, nuclei_3d, capsys):
    image, gt = nuclei_3d
    tifffile.imwrite(tmp_path / "vol.tif", image[:20])
    seeds = np.zeros((20, 100, 100), np.uint16)
    seeds[10][gt[10] == gt[10].max()] = 4
    tifffile.imwrite(tmp_path / "seeds.tif", seeds)
    out = tmp_path / "out.tif"
    args = ["propagate", str(tmp_path / "vol.tif"), str(tmp_path / "seeds.tif"), "--model", str(tiny_checkpoint),
            "--dtype", "float32", "--out", str(out), "--cache", str(tmp_path / "cache.zarr")]
    assert main(args) == 0
    result = tifffile.imread(out)
    assert result.shape == (20, 100, 100) and np.array_equal(result[10] == 4, seeds[10] == 4)
    assert set(np.unique(result)) <= {0, 4}
    assert "object 4: written on" in capsys.readouterr().out
    assert np.array_equal(tifffile.imread(tmp_path / "seeds.tif"), seeds)
    assert main(args) == 2 and "exists" in capsys.readouterr().err


@pytest.mark.viewer
def test_annotate_opens_napari_with_the_widget(tmp_path, tiny_checkpoint):
    import subprocess
    import sys

    shot = tmp_path / "shot.png"
    subprocess.run([sys.executable, "-m", "napari_sam.cli", "annotate", "--sample", "nuclei_2d", "--model",
                    str(tiny_checkpoint), "--start", "--screenshot", str(shot)], check=True, timeout=300)
    from skimage.io import imread

    pixels = imread(shot)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 600 and pixels.std() > 10


def test_train_writes_a_checkpoint_that_loads_and_resumes(tmp_path, tiny_checkpoint, nuclei_2d, capsys):
    from napari_sam.core.models import load_model

    image, labels = nuclei_2d
    tifffile.imwrite(tmp_path / "img.tif", np.stack([image[:128, :128], image[128:256, 128:256]]))
    tifffile.imwrite(tmp_path / "lab.tif", np.stack([labels[:128, :128], labels[128:256, 128:256]]))
    out = tmp_path / "tuned.pth"
    args = ["train", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "lab.tif"), "--model", str(tiny_checkpoint),
            "--out", str(out), "--steps", "2", "--device", "cpu"]
    assert main(args) == 0
    assert "saved" in capsys.readouterr().out and out.is_file()
    model = load_model(out)
    assert model.metadata["training"]["steps"] == 2 and model.metadata["training"]["mode"] == "decoder"
    assert main(args) == 2 and "--resume" in capsys.readouterr().err



def _training_pair(folder, nuclei_2d):
    image, labels = nuclei_2d
    tifffile.imwrite(folder / "img.tif", np.stack([image[:128, :128], image[128:256, 128:256]]))
    tifffile.imwrite(folder / "lab.tif", np.stack([labels[:128, :128], labels[128:256, 128:256]]))
    return ["train", str(folder / "img.tif"), "--labels", str(folder / "lab.tif"), "--device", "cpu"]


def test_a_resumed_run_keeps_the_instance_decoder_and_a_finished_one_is_left_alone(tmp_path, nuclei_2d, capsys):
    from napari_sam.model.checkpoint import read_checkpoint
    from napari_sam.model.decoder_checkpoint import DECODER_KEY

    out = tmp_path / "tuned.pth"
    # the default model records a 256-pixel input, which its shapes alone used to be read as 1024
    args = _training_pair(tmp_path, nuclei_2d) + ["--model", "default", "--out", str(out)]
    assert main(args + ["--steps", "1"]) == 0
    assert main(args + ["--steps", "2", "--resume"]) == 0
    saved = read_checkpoint(out)
    assert saved.metadata["training"]["steps"] == 2 and saved.metadata["config"]["image_size"] == 256
    assert DECODER_KEY in saved.extras and "ais" in saved.metadata["automatic"]  # AIS still offered
    before = out.read_bytes()
    capsys.readouterr()
    assert main(args + ["--steps", "2", "--resume"]) == 0
    assert "nothing to train" in capsys.readouterr().out and out.read_bytes() == before


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP"])  # Ctrl-C, a cluster's time limit, a closed terminal
def test_the_first_ctrl_c_in_train_stops_and_saves(tmp_path, tiny_checkpoint, nuclei_2d, monkeypatch, capsys, name):
    import signal

    from napari_sam.core.models import load_model
    from napari_sam.train import Trainer

    run = Trainer.run
    sent = getattr(signal, name)

    def interrupted_after_the_first_step(self):
        for record in run(self):
            if record.step == 1:
                signal.raise_signal(sent)  # as a Ctrl-C in the terminal, during the first step
            yield record

    monkeypatch.setattr(Trainer, "run", interrupted_after_the_first_step)
    out = tmp_path / "tuned.pth"
    previous = signal.getsignal(sent)
    assert main(_training_pair(tmp_path, nuclei_2d) + ["--model", str(tiny_checkpoint), "--out", str(out),
                                                        "--steps", "50"]) == 128 + sent  # saved, not finished
    captured = capsys.readouterr()
    assert "stopping after this step" in captured.err
    assert "stopped before step 50 (--resume continues it)" in captured.out
    assert load_model(out).metadata["training"]["steps"] == 1  # what was learned is kept, and resumable
    assert signal.getsignal(sent) is previous  # the terminal's Ctrl-C is the usual one again

def test_segment_boxes_and_auto_modes(tmp_path, tiny_checkpoint, nuclei_2d, nuclei_3d, capsys):
    tifffile.imwrite(tmp_path / "img.tif", nuclei_2d[0][:200, :200])
    out = tmp_path / "boxes.tif"
    assert main(["segment", str(tmp_path / "img.tif"), "--model", str(tiny_checkpoint), "--mode", "boxes",
                 "--out", str(out)]) == 0
    labels = tifffile.imread(out)
    assert labels.shape == (200, 200) and labels.max() >= 1
    n = int(capsys.readouterr().out.split("wrote ")[1].split(" ")[0])
    assert n == len(np.unique(labels)) - 1
    tifffile.imwrite(tmp_path / "vol.tif", nuclei_3d[0][:3], photometric="minisblack")
    out3 = tmp_path / "auto.tif"
    assert main(["segment", str(tmp_path / "vol.tif"), "--model", str(tiny_checkpoint), "--mode", "auto",
                 "--points-per-side", "3", "--axes", "ZYX", "--out", str(out3)]) == 0
    assert tifffile.imread(out3).shape == (3, 100, 100)


def test_evaluate_prints_a_table_and_writes_json(tmp_path, tiny_checkpoint, nuclei_2d, capsys):
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", nuclei_2d[0][:128, :128])
    tifffile.imwrite(tmp_path / "labels" / "a.tif", nuclei_2d[1][:128, :128])
    report = tmp_path / "r.json"
    assert main(["evaluate", str(tmp_path), "--model", str(tiny_checkpoint), "--baseline", "--max-objects", "3",
                 "--corrections", "1", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "| tiny_sam.pth | 1 | 3 |" in out and "| watershed baseline | 1 | 3 |" in out
    results = json.loads(report.read_text())
    assert [r["method"] for r in results] == ["tiny_sam.pth", "watershed baseline"]
    assert all(0 <= r["point"] <= 1 and 0 <= r["box"] <= 1 for r in results)
    assert main(["evaluate", str(tmp_path / "images"), str(tmp_path / "nothing")]) == 2
    capsys.readouterr()
    # --json -: the report alone on stdout (for jq), the table on stderr
    assert main(["evaluate", str(tmp_path), "--max-objects", "3", "--corrections", "0", "--json", "-"]) == 0
    out, err = capsys.readouterr()
    assert [r["method"] for r in json.loads(out)] == ["watershed baseline"] and "| watershed baseline | 1 | 3 |" in err


def test_evaluate_measures_propagation_on_volumes(tmp_path, tiny_checkpoint, nuclei_3d, capsys):
    image, labels = nuclei_3d[0][30:46, :48, :48], nuclei_3d[1][30:46, :48, :48]
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    tifffile.imwrite(tmp_path / "images" / "v.tif", image)
    tifffile.imwrite(tmp_path / "labels" / "v.tif", labels)
    report = tmp_path / "r.json"
    assert main(["evaluate", str(tmp_path), "--model", str(tiny_checkpoint), "--baseline", "--max-objects", "2",
                 "--json", str(report)]) == 0
    assert "mean 3D IoU" in capsys.readouterr().out
    results = json.loads(report.read_text())
    assert [r["kind"] for r in results] == ["propagation", "propagation"]
    assert [r["method"] for r in results] == ["tiny_sam.pth (propagation)", "watershed baseline (propagation)"]
    for r in results:
        assert r["objects"] == 2 and 0 <= r["mean_iou"] <= 1
        for o in r["per_object"]:
            zs = np.flatnonzero((labels == o["id"]).any(axis=(1, 2)))
            assert o["start_plane"] == zs[len(zs) // 2] and o["volume"] == "v"


def test_the_headless_main_job_segments_the_prompted_nuclei(tmp_path, capsys):
    # README's first command without a display: the default model, the bundled sample, the
    # documented prompts (a click, a box, a click with a background click).
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    sample = repo / "src" / "napari_sam" / "_data"
    out = tmp_path / "nuclei_labels.tif"
    assert main(["segment", str(sample / "nuclei_2d.tif"), "--model", "default", "--prompts",
                 str(repo / "docs" / "examples" / "nuclei_2d_prompts.json"), "--out", str(out)]) == 0
    assert "(4x4 tile(s), magnification 1.25) with default" in capsys.readouterr().out  # 24-pixel nuclei
    labels, truth = tifffile.imread(out), tifffile.imread(sample / "nuclei_2d_labels.tif")
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    for k in (1, 2, 3):
        got = labels == k
        ids, counts = np.unique(truth[got], return_counts=True)
        nucleus = truth == ids[ids > 0][np.argmax(counts[ids > 0])]
        assert (got & nucleus).sum() / (got | nucleus).sum() > 0.45


def test_segment_everything_with_the_default_model_uses_its_settings(tmp_path, nuclei_2d):
    # With SAM's own filters the small default model would return nothing in auto mode.
    from napari_sam.evaluate import instance_scores

    image, truth = nuclei_2d
    tifffile.imwrite(tmp_path / "img.tif", image)
    assert main(["segment", str(tmp_path / "img.tif"), "--model", "default", "--mode", "boxes",
                 "--out", str(tmp_path / "b.tif")]) == 0
    boxes = tifffile.imread(tmp_path / "b.tif")
    assert instance_scores(truth, boxes)["ap50"] > 0.4  # LoG boxes, as measured for this model
    assert main(["segment", str(tmp_path / "img.tif"), "--model", "default", "--mode", "auto", "--points-per-side", "8",
                 "--out", str(tmp_path / "a.tif")]) == 0
    assert len(np.unique(tifffile.imread(tmp_path / "a.tif"))) > 10


def test_segment_modes_are_the_automatic_modes_the_package_knows():
    # the parser stays free of heavy imports, so its choices are written out; they must
    # follow the one list of mode names
    from napari_sam.auto.recommend import MODES
    from napari_sam.cli.parser import build_parser
    from napari_sam.layers.everything import MODE_NAMES

    segment = build_parser()._subparsers._group_actions[0].choices["segment"]
    mode = next(a for a in segment._actions if a.dest == "mode")
    assert tuple(mode.choices) == ("prompts", *MODES)
    assert set(MODES) < set(MODE_NAMES)
    from napari_sam.auto.boxes import DETECTORS
    from napari_sam.auto.modes import PLANNERS

    assert set(PLANNERS) == set(MODES)  # a mode without its planner would have run as another
    detector = next(a for a in segment._actions if a.dest == "detector")
    assert tuple(detector.choices) == DETECTORS


def test_segment_reads_the_cache_that_embed_made(tmp_path, tiny_checkpoint, nuclei_3d, capsys, monkeypatch):
    # embed on one machine, segment on another: the tiles are read, not computed again
    import tifffile

    from napari_sam.core.embedding_store import describe_cache

    monkeypatch.setenv("NAPARI_SAM_CACHE_DIR", str(tmp_path / "user-cache"))
    image = tmp_path / "vol.tif"
    tifffile.imwrite(image, nuclei_3d[0][:2, :96, :96], imagej=True, metadata={"axes": "ZYX"})
    model = ["--model", str(tiny_checkpoint), "--dtype", "float32"]
    assert main(["embed", str(image), *model]) == 0
    (cache,) = (tmp_path / "user-cache" / "embeddings").glob("*.zarr")
    chunks = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and "features" in p.parts}
    assert chunks and describe_cache(cache)[0]["present"] == 2
    capsys.readouterr()
    for mode in (["--point", "40", "40", "--plane", "1"], ["--mode", "boxes"]):
        out = tmp_path / f"lab{len(mode)}.tif"
        assert main(["segment", str(image), *model, *mode, "--cache", "--out", str(out)]) == 0
        assert out.is_file()
    assert len(describe_cache(cache)) == 1  # no other signature beside embed's
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and "features" in p.parts} == chunks
    with pytest.raises(SystemExit):  # --cache takes one folder at most
        main(["segment", str(image), "--cache", "a", "b"])
