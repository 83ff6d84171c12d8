"""The output rule: no command destroys an input or anything it did not write, and an output
that cannot be written is refused before the model loads."""

import os

import numpy as np
import pytest
import tifffile

from napari_sam.cli import main


@pytest.fixture()
def no_model(monkeypatch):
    """Loading a model fails the test: the refusals must come before any work."""
    import napari_sam.core.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.fixture()
def volume_zarr(tmp_path):
    import zarr

    data = np.random.default_rng(0).integers(0, 255, (3, 48, 48), dtype=np.uint8)
    z = zarr.create_array(str(tmp_path / "vol.zarr"), shape=data.shape, dtype="uint8", chunks=(1, 24, 24))
    z[...] = data
    return tmp_path / "vol.zarr", data


def _listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


def test_out_equal_to_the_zarr_input_is_refused(tmp_path, volume_zarr, no_model, capsys):
    import zarr

    path, data = volume_zarr
    before = _listing(path)
    rc = main(["segment", str(path), "--model", "x.pth", "--mode", "boxes", "--out", str(path), "--overwrite"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {path} is the image {path}" in err
    assert _listing(path) == before
    np.testing.assert_array_equal(np.asarray(zarr.open_array(str(path), mode="r")), data)


def test_out_equal_to_the_tiff_input_is_refused(tmp_path, no_model, capsys):
    img = np.arange(48 * 48, dtype=np.uint16).reshape(48, 48)
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, img)
    # the same file under another spelling is still the input
    other = tmp_path / "sub" / ".." / "img.tif"
    (tmp_path / "sub").mkdir()
    assert main(["segment", str(path), "--model", "x.pth", "--point", "3", "3", "--out", str(other),
                 "--overwrite"]) == 2
    assert "is the image" in capsys.readouterr().err
    np.testing.assert_array_equal(tifffile.imread(path), img)


def test_propagate_refuses_to_write_over_its_seeds_or_into_the_image(tmp_path, volume_zarr, no_model, capsys):
    path, _ = volume_zarr
    seeds = tmp_path / "seeds.tif"
    tifffile.imwrite(seeds, np.ones((3, 48, 48), np.uint8), photometric="minisblack")
    assert main(["propagate", str(path), str(seeds), "--model", "x.pth", "--out", str(seeds), "--overwrite"]) == 2
    assert f"is the seeds {seeds}" in capsys.readouterr().err
    assert (tifffile.imread(seeds) == 1).all()
    assert main(["propagate", str(path), str(seeds), "--model", "x.pth", "--out", str(tmp_path / "o.tif"),
                 "--cache", str(path / "cache.zarr")]) == 2
    assert "--cache" in capsys.readouterr().err and not (path / "cache.zarr").exists()


def test_embed_cache_inside_the_image_is_refused(tmp_path, volume_zarr, no_model, capsys):
    path, _ = volume_zarr
    before = _listing(path)
    assert main(["embed", str(path), "--model", "x.pth", "--out", str(path / "emb.zarr")]) == 2
    assert f"lies inside the image {path}" in capsys.readouterr().err
    assert _listing(path) == before
    assert main(["embed", str(path), "--model", "x.pth", "--out", str(tmp_path)]) == 2
    assert f"contains the image {path}" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["folder", "group", "image_array"])
def test_overwrite_never_deletes_what_it_did_not_write(tmp_path, kind, no_model, capsys):
    import zarr

    target = tmp_path / "labels.zarr"
    if kind == "folder":
        (target / "notes").mkdir(parents=True)
        (target / "notes" / "todo.txt").write_text("mine")
    elif kind == "group":
        zarr.open_group(str(target), mode="w").create_array("0", shape=(4, 4), dtype="uint8")
    else:  # a Zarr array someone else wrote: an image, not our labels
        zarr.create_array(str(target), shape=(4, 4), dtype="uint8")[...] = 7
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((32, 32), np.uint8))
    before = _listing(target)
    assert main(["segment", str(tmp_path / "img.tif"), "--model", "x.pth", "--point", "3", "3", "--out", str(target),
                 "--overwrite"]) == 2
    assert "not a label array written by napari-sam" in capsys.readouterr().err
    assert _listing(target) == before


def test_overwrite_replaces_only_a_file_for_a_file_suffix(tmp_path, no_model, capsys):
    (tmp_path / "labels.tif").mkdir()
    (tmp_path / "labels.tif" / "keep.txt").write_text("mine")
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((32, 32), np.uint8))
    assert main(["segment", str(tmp_path / "img.tif"), "--model", "x.pth", "--point", "3", "3", "--out",
                 str(tmp_path / "labels.tif"), "--overwrite"]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert (tmp_path / "labels.tif" / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_our_own_zarr_labels(tmp_path, tiny_checkpoint, capsys):
    import zarr

    from napari_sam.core.io import write_labels

    tifffile.imwrite(tmp_path / "img.tif", np.zeros((32, 32), np.uint8))
    out = write_labels(tmp_path / "labels.zarr", np.full((32, 32), 9, np.uint8))
    assert main(["segment", str(tmp_path / "img.tif"), "--model", str(tiny_checkpoint), "--dtype", "float32",
                 "--point", "3", "3", "--out", str(out), "--overwrite"]) == 0
    replaced = np.asarray(zarr.open_array(str(out), mode="r"))
    assert replaced.shape == (32, 32) and 9 not in replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.tif", "labels.zarr"]  # nothing left aside


def test_missing_output_folder_is_refused_before_the_model_loads(tmp_path, no_model, capsys):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((32, 32), np.uint8))
    out = tmp_path / "nowhere" / "labels.tif"
    assert main(["segment", str(tmp_path / "img.tif"), "--model", "x.pth", "--point", "3", "3",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"the folder {out.parent} does not exist" in err and err.count("\n") == 1
    assert not out.parent.exists()  # not created either


def test_unwritable_output_folder_is_refused_before_the_model_loads(tmp_path, no_model, monkeypatch, capsys):
    import napari_sam.core.outputs as outputs

    tifffile.imwrite(tmp_path / "img.tif", np.zeros((32, 32), np.uint8))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # the super-user writes anywhere: make the folder refuse files
            def refuse(*args, **kwargs):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(outputs.tempfile, "mkstemp", refuse)
        for argv in (["segment", str(tmp_path / "img.tif"), "--point", "3", "3"],
                     ["propagate", str(tmp_path / "img.tif"), str(tmp_path / "img.tif")]):
            assert main([*argv, "--model", "x.pth", "--out", str(locked / "labels.tif")]) == 2
            err = capsys.readouterr().err
            assert f"cannot write in the folder {locked}" in err and err.count("\n") == 1
        assert main(["embed", str(tmp_path / "img.tif"), "--model", "x.pth", "--out", str(locked / "c.zarr")]) == 2
        assert f"cannot write in the folder {locked}" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_a_failed_write_leaves_the_old_labels_and_no_half_file(tmp_path, monkeypatch):
    import tifffile as tf

    from napari_sam.core.io import write_labels

    out = write_labels(tmp_path / "l.tif", np.ones((8, 8), np.uint8))

    def crash(path, data, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"II*\x00half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tf, "imwrite", crash)
    with pytest.raises(OSError, match="No space"):
        write_labels(out, np.full((8, 8), 2, np.uint8), overwrite=True)
    monkeypatch.undo()
    assert (tifffile.imread(out) == 1).all()
    assert [p.name for p in tmp_path.iterdir()] == ["l.tif"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_labels(tmp_path / "new" / "l.tif", np.ones((2, 2), np.uint8))


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_train_and_evaluate_check_their_output_first(tmp_path, no_model, capsys, command):
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
        tifffile.imwrite(tmp_path / sub / "a.tif", np.ones((32, 32), np.uint8))
    out = tmp_path / "nowhere" / ("m.pth" if command == "train" else "r.json")
    argv = ["train", tmp_path, "--out", out] if command == "train" else ["evaluate", tmp_path, "--json", out]
    assert main([str(a) for a in argv] + ["--model", "x.pth"]) == 2
    assert f"the folder {out.parent} does not exist" in capsys.readouterr().err
    argv[argv.index(out)] = tmp_path / "images" / "a.tif"  # an image is never the output
    assert main([str(a) for a in argv] + ["--model", "x.pth"]) == 2
    assert "written as" in capsys.readouterr().err
    assert (tifffile.imread(tmp_path / "images" / "a.tif") == 1).all()


def _pair_folder(folder, labels):
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "images" / "a.tif", np.full(labels.shape, 100, np.uint8))
    tifffile.imwrite(folder / "labels" / "a.tif", labels)
    return folder


def test_evaluate_json_is_not_written_over_unless_asked_and_is_strict(tmp_path, capsys):
    import json

    data = _pair_folder(tmp_path / "data", np.zeros((32, 32), np.uint16))  # no objects: scores of nothing
    report = tmp_path / "r.json"
    report.write_text('{"my": "results"}')
    argv = ["evaluate", str(data), "--baseline", "--max-objects", "1", "--corrections", "0", "--json", str(report)]
    assert main(argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err and report.read_text() == '{"my": "results"}'
    assert main(argv + ["--overwrite"]) == 0

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    results = json.loads(report.read_text(), parse_constant=no_constants)  # strict JSON: no NaN
    assert results[0]["objects"] == 0 and results[0]["point"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "r.json"]  # no temporary file left beside it


def test_negative_label_ids_are_refused_in_one_line(tmp_path, tiny_checkpoint, capsys):
    labels = np.zeros((32, 32), np.int16)
    labels[4:12, 4:12], labels[20:28, 20:28] = 1, -1  # -1: a common "ignore" value
    data = _pair_folder(tmp_path / "data", labels)
    # evaluate and train agree on what an object is (train used to learn from the -1 patch)
    for command in ("evaluate", "train"):
        extra = ["--out", str(tmp_path / "m.pth"), "--steps", "1"] if command == "train" else []
        assert main([command, str(data), "--model", str(tiny_checkpoint), *extra]) == 2
        err = capsys.readouterr().err
        assert "a.tif: the labels hold negative values (down to -1)" in err and err.count("\n") == 1
    assert not (tmp_path / "m.pth").exists()


def test_negative_seed_ids_are_refused_before_the_model_loads(tmp_path, no_model, capsys):
    seeds = np.zeros((3, 32, 32), np.int32)
    seeds[1, 4:12, 4:12], seeds[1, 20:24, 20:24] = 1, -1
    tifffile.imwrite(tmp_path / "vol.tif", np.full((3, 32, 32), 100, np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "seeds.tif", seeds, photometric="minisblack")
    assert main(["propagate", str(tmp_path / "vol.tif"), str(tmp_path / "seeds.tif"), "--model", "x.pth",
                 "--axes", "ZYX", "--out", str(tmp_path / "out.tif")]) == 2
    assert "seeds.tif hold negative values (down to -1)" in capsys.readouterr().err
    assert not (tmp_path / "out.tif").exists()


def test_overwrite_replaces_our_own_label_tiff_and_never_an_image(tmp_path, tiny_checkpoint, capsys):
    from napari_sam.core.io import write_labels

    raw = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", raw)
    tifffile.imwrite(tmp_path / "other_image.tif", raw)  # a typo in --out names another raw image
    argv = ["segment", str(tmp_path / "img.tif"), "--model", str(tiny_checkpoint), "--dtype", "float32",
            "--point", "3", "3", "--overwrite", "--out"]
    assert main(argv + [str(tmp_path / "other_image.tif")]) == 2
    assert "not a label image written by napari-sam" in capsys.readouterr().err
    assert np.array_equal(tifffile.imread(tmp_path / "other_image.tif"), raw)
    ours = write_labels(tmp_path / "labels.tif", np.full((32, 32), 9, np.uint16))
    assert main(argv + [str(ours)]) == 0
    assert 9 not in tifffile.imread(ours)
    assert main(argv + [str(ours)]) == 0  # and what it wrote this time, again


def test_propagate_checks_its_image_and_seeds_before_the_model_loads(tmp_path, no_model, capsys):
    tifffile.imwrite(tmp_path / "vol.tif", np.full((3, 32, 32), 100, np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "plane.tif", np.full((32, 32), 100, np.uint8))
    tifffile.imwrite(tmp_path / "seeds.tif", np.ones((2, 32, 32), np.uint16), photometric="minisblack")
    base = ["propagate", "--model", "x.pth", "--out", str(tmp_path / "out.tif")]
    assert main(base[:1] + [str(tmp_path / "vol.tif"), str(tmp_path / "seeds.tif"), "--axes", "ZYX"] + base[1:]) == 2
    assert "seeds.tif have shape (2, 32, 32), but the image needs (3, 32, 32)" in capsys.readouterr().err
    assert main(base[:1] + [str(tmp_path / "plane.tif"), str(tmp_path / "seeds.tif")] + base[1:]) == 2
    assert "plane.tif is a 2D image: it has no planes to propagate through" in capsys.readouterr().err
    assert not (tmp_path / "out.tif").exists()
