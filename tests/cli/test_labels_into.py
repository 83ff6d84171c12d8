"""``--labels-into``: the command line writes its labels into an OME-Zarr image as the NGFF
label image labels/NAME, read back here with ome-zarr-py at several levels; refusals end in
one line before the model loads and leave the container as it was."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_sam.cli import main
from napari_sam.core.label_pyramid import downsample, level_factors

DATA = Path(__file__).resolve().parents[2] / "src" / "napari_sam" / "_data"


def make_image(path: Path, data: np.ndarray, axes: str, version: str = "0.5") -> Path:
    """An OME-Zarr image written by ome-zarr-py, three levels (Y and X halved, Z kept)."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt = FormatV04() if version == "0.4" else FormatV05()
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    write_image(data, group, axes=axes, fmt=fmt, scale_factors=[2, 4], scale=dict.fromkeys(axes, 1.0),
                storage_options={"chunks": (1,) * (data.ndim - 2) + (64, 64)})
    return path


def image_files(path: Path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in path.rglob("*")
            if p.is_file() and "labels" not in p.relative_to(path).parts}


def read_labels(path: Path, name: str = "napari-sam"):
    """The label image as ome-zarr-py reads it: (levels as numpy, node metadata, image node)."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(path)))())
    node = next(n for n in nodes if "image-label" in n.zarr.root_attrs and n.zarr.basename() == name)
    image = next(n for n in nodes if "image-label" not in n.zarr.root_attrs and n.data)
    return [np.asarray(d) for d in node.data], node, image


def assert_pyramid(levels, node) -> None:
    """Every lower level is the centre sample of level 0 at its scale."""
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    factors = level_factors([lv.shape for lv in levels], scales)
    for level, f in zip(levels[1:], factors[1:]):
        np.testing.assert_array_equal(level, downsample(levels[0], level.shape, f))


@pytest.fixture()
def no_model(monkeypatch):
    import napari_sam.core.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)


def test_segment_writes_into_the_image_itself_and_refuses_to_replace_without_overwrite(tmp_path, monkeypatch,
                                                                                        capsys):
    crop = (slice(0, 256), slice(0, 256))
    path = make_image(tmp_path / "nuclei.ome.zarr", tifffile.imread(DATA / "nuclei_2d.tif")[crop], "yx")
    truth = tifffile.imread(DATA / "nuclei_2d_labels.tif")[crop] == 106  # a whole nucleus of the crop
    before = image_files(path)
    argv = ["segment", str(path), "--model", "default", "--dtype", "float32", "--point", "193", "226",
            "--labels-into", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"wrote 1 object(s) into {path} as the label image labels/napari-sam, 3 resolution level(s)" in out
    levels, node, image = read_labels(path)
    assert [lv.shape for lv in levels] == [d.shape for d in image.data] == [(256, 256), (128, 128), (64, 64)]
    assert node.zarr.root_attrs["image-label"]["source"] == {"image": "../../"}
    got = levels[0] == 1
    assert set(np.unique(levels[0])) == {0, 1} and (got & truth).sum() / (got | truth).sum() > 0.6
    assert (levels[1] == 1).sum() > got.sum() / 8 and (levels[2] == 1).any()
    assert_pyramid(levels, node)
    assert image_files(path) == before
    # napari's OME-Zarr plugin finds it as a multiscale labels layer over the image
    napari_ome_zarr = pytest.importorskip("napari_ome_zarr")
    layers = napari_ome_zarr.napari_get_reader(str(path))(str(path))
    shown = [(data, meta) for data, meta, kind in layers if kind == "labels"]
    assert len(shown) == 1 and shown[0][1]["name"].endswith("napari-sam")
    assert [np.asarray(d).shape for d in shown[0][0]] == [lv.shape for lv in levels]
    np.testing.assert_array_equal(np.asarray(shown[0][0][1]), levels[1])
    # again without --overwrite: one line, before the model loads, nothing changed
    import napari_sam.core.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    listing = sorted((p.relative_to(path), p.read_bytes()) for p in path.rglob("*") if p.is_file())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the label image {path}/labels/napari-sam exists; pass --overwrite" in err
    assert sorted((p.relative_to(path), p.read_bytes()) for p in path.rglob("*") if p.is_file()) == listing


def test_outputs_are_required_and_checked_before_the_model_loads(tmp_path, no_model, capsys):
    vol = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    path = make_image(tmp_path / "vol.ome.zarr", vol, "zyx")
    other = make_image(tmp_path / "small.ome.zarr", vol[:, :32], "zyx")
    tifffile.imwrite(tmp_path / "vol.tif", vol, photometric="minisblack")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cases = [
        (["segment", path, "--point", 3, 3, "--plane", 1], "no output: give --out"),
        (["propagate", path, tmp_path / "vol.tif"], "no output: give --out"),
        (["segment", path, "--point", 3, 3, "--plane", 1, "--out", tmp_path / "o.tif", "--label-name", "x"],
         "--label-name x names a label image of --labels-into, which is not given"),
        (["segment", path, "--mode", "auto", "--labels-into", other],
         "labels of shape (3, 64, 64) do not fit the OME-Zarr image"),
        (["propagate", path, tmp_path / "vol.tif", "--labels-into", tmp_path / "vol.tif"],
         "vol.tif is not an OME-Zarr image"),
        (["segment", path, "--point", 3, 3, "--plane", 1, "--labels-into", path, "--label-name", "a/b"],
         "label image name 'a/b'"),
        (["segment", path, "--point", 3, 3, "--plane", 1, "--labels-into", path, "--label-name", ""],
         "label image name ''"),  # not the default name in disguise
        (["segment", tmp_path / "vol.tif", "--point", 3, 3, "--plane", 1, "--labels-into", other],
         "labels of shape (3, 64, 64) do not fit"),
    ]
    for argv, expected in cases:
        assert main([str(a) for a in argv] + ["--model", "x.pth"]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_boxes_propagate_and_a_prompted_plane_go_into_a_volume(tmp_path, tiny_checkpoint, nuclei_3d, version,
                                                               capsys):
    image, truth = nuclei_3d
    vol = image[40:43, :64, :64]
    path = make_image(tmp_path / "vol.ome.zarr", vol, "zyx", version)
    before = image_files(path)
    model = ["--model", str(tiny_checkpoint), "--dtype", "float32"]
    # segment everything: --out and --labels-into together
    assert main(["segment", str(path), *model, "--mode", "boxes", "--out", str(tmp_path / "b.tif"),
                 "--labels-into", str(path), "--label-name", "boxes"]) == 0
    levels, node, _ = read_labels(path, "boxes")
    np.testing.assert_array_equal(levels[0], tifffile.imread(tmp_path / "b.tif"))
    assert [lv.shape for lv in levels] == [(3, 64, 64), (3, 32, 32), (3, 16, 16)]
    assert_pyramid(levels, node)
    # propagate: seeds from a file, the result into the container
    seeds = np.zeros(vol.shape, np.uint16)
    seeds[1][truth[41, :64, :64] == np.bincount(truth[41, :64, :64].ravel())[1:].argmax() + 1] = 5
    assert (seeds[1] == 5).sum() > 20
    tifffile.imwrite(tmp_path / "seeds.tif", seeds, photometric="minisblack")
    assert main(["propagate", str(path), str(tmp_path / "seeds.tif"), *model, "--labels-into", str(path),
                 "--cache", str(tmp_path / "cache.zarr")]) == 0
    assert "into" in capsys.readouterr().out
    levels, node, _ = read_labels(path)
    assert set(np.unique(levels[0])) <= {0, 5} and (levels[0][1] == 5).sum() >= (seeds[1] == 5).sum()
    assert_pyramid(levels, node)
    # one prompted plane replaces it (--overwrite): the other planes are background
    assert main(["segment", str(path), *model, "--plane", "2", "--box", "10", "10", "40", "40",
                 "--labels-into", str(path), "--overwrite"]) == 0
    assert "(plane (2,))" in capsys.readouterr().out
    levels, node, _ = read_labels(path)
    assert not levels[0][:2].any() and levels[0][2].max() == 1
    assert_pyramid(levels, node)
    group = zarr.open_group(str(path / "labels"), mode="r")
    assert sorted((dict(group.attrs).get("ome") or dict(group.attrs))["labels"]) == ["boxes", "napari-sam"]
    assert image_files(path) == before


def test_add_annotates_a_volume_plane_by_plane_keeping_earlier_objects(tmp_path, tiny_checkpoint, nuclei_3d, capsys):
    image, _ = nuclei_3d
    path = make_image(tmp_path / "vol.ome.zarr", image[40:43, :64, :64], "zyx")
    before = image_files(path)
    model = ["--model", str(tiny_checkpoint), "--dtype", "float32"]

    def add(plane: int, box: list[int]) -> int:
        return main(["segment", str(path), *model, "--plane", str(plane), "--box", *map(str, box),
                     "--labels-into", str(path), "--add"])

    assert add(0, [5, 5, 30, 30]) == 0  # creates labels/napari-sam
    assert add(2, [10, 10, 40, 40]) == 0
    assert add(0, [35, 35, 60, 60]) == 0  # the same plane again: the first object stays
    out = capsys.readouterr().out
    assert "as ids [1]" in out and "as ids [2]" in out and "as ids [3]" in out
    levels, node, _ = read_labels(path)
    full = levels[0]
    assert set(np.unique(full[0])) == {0, 1, 3} and set(np.unique(full[2])) == {0, 2} and not full[1].any()
    assert_pyramid(levels, node)
    assert image_files(path) == before
    # --add needs --labels-into, prompts, and no --overwrite: one line each, nothing written
    for extra in (["--overwrite"], ["--mode", "boxes"]):
        assert main(["segment", str(path), *model, "--plane", "1", "--box", "5", "5", "30", "30",
                     "--labels-into", str(path), "--add", *extra]) == 2
        assert "--add" in capsys.readouterr().err
    assert main(["segment", str(path), *model, "--plane", "1", "--box", "5", "5", "30", "30",
                 "--out", str(tmp_path / "x.tif"), "--add"]) == 2
    assert not (tmp_path / "x.tif").exists()
    np.testing.assert_array_equal(read_labels(path)[0][0], full)


def test_a_prompt_on_a_multichannel_image_reads_its_declared_axes(tmp_path, tiny_checkpoint, nuclei_3d, capsys):
    image, _ = nuclei_3d
    volume = image[40:43, :64, :64]
    czyx = np.stack([volume, volume[:, ::-1]])  # C, Z, Y, X
    path = make_image(tmp_path / "cells.ome.zarr", czyx, "czyx")
    model = ["--model", str(tiny_checkpoint), "--dtype", "float32"]
    assert main(["segment", str(path), *model, "--plane", "2", "--channel", "1", "--box", "10", "10", "40", "40",
                 "--labels-into", str(path), "--out", str(tmp_path / "o.tif")]) == 0
    levels, _, _ = read_labels(path)
    assert levels[0].shape == (3, 64, 64) and not levels[0][:2].any() and levels[0][2].max() == 1
    assert tifffile.imread(tmp_path / "o.tif").shape == (64, 64)
    capsys.readouterr()
    # the channel is not a plane: --plane names Z alone
    assert main(["segment", str(path), *model, "--plane", "1", "2", "--channel", "1", "--box", "10", "10", "40", "40",
                 "--out", str(tmp_path / "p.tif")]) == 2
    assert "needs --plane with 1 index(es) (Z 0 to 2)" in capsys.readouterr().err
    # a channels-first TIFF named by --axes
    tifffile.imwrite(tmp_path / "cyx.tif", czyx[:, 0], photometric="minisblack")
    assert main(["segment", str(tmp_path / "cyx.tif"), *model, "--axes", "CYX", "--channel", "1", "--point", "20", "30",
                 "--out", str(tmp_path / "q.tif")]) == 0
    assert tifffile.imread(tmp_path / "q.tif").shape == (64, 64)
