"""`napari-sam segment --mode ais|apg|auto|boxes`: the same objects as the API, a volume
linked through z, and one line when the model has no instance decoder."""

import numpy as np
import pytest
import tifffile

from napari_sam.api import Annotator
from napari_sam.cli import main
from tests.conftest import drain
from tests.test_api_everything import random_decoder


@pytest.fixture(scope="module")
def images(tmp_path_factory, nuclei_3d):
    folder = tmp_path_factory.mktemp("images")
    volume = np.ascontiguousarray(nuclei_3d[0][40:42, :64, :80])
    tifffile.imwrite(folder / "vol.tif", volume, photometric="minisblack")
    tifffile.imwrite(folder / "img.tif", volume[1])
    return folder, volume


@pytest.fixture(scope="module")
def decoder_checkpoint(tmp_path_factory, tiny_sam, images):
    """The tiny SAM with a random instance decoder in one file, as micro-sam stores it, and
    advice of AIS thresholds at the medians of its maps (it then finds many objects)."""
    from napari_sam.auto import iter_instance_maps
    from napari_sam.core.embeddings import Embeddings
    from napari_sam.model.checkpoint import write_checkpoint

    decoder = random_decoder()
    _, maps = drain(iter_instance_maps(Embeddings(images[1][1], tiny_sam, cache=False), 0, decoder))
    fg, centre, boundary = (float(np.median(m)) for m in maps)
    advice = {"ais": {"foreground_threshold": fg, "center_distance_threshold": centre,
                      "boundary_distance_threshold": boundary}}
    path = tmp_path_factory.mktemp("ckpt") / "with_decoder.pth"
    write_checkpoint(path, tiny_sam.state_dict(), {"automatic": advice}, extras={"decoder_state": decoder.state_dict()})
    return path


def test_ais_gives_the_apis_objects_on_an_image_and_a_linked_volume(images, decoder_checkpoint, capsys):
    folder, volume = images
    out = folder / "ais.tif"
    assert main(["segment", str(folder / "img.tif"), "--model", str(decoder_checkpoint), "--mode", "ais",
                 "--out", str(out)]) == 0
    got = tifffile.imread(out)
    expected = Annotator(volume[1], str(decoder_checkpoint), cache=False).segment_everything(
        mode="ais", commit=False, progress=False)
    assert got.shape == (64, 80) and expected.max() > 3
    np.testing.assert_array_equal(got, expected)
    assert f"wrote {int(expected.max())} object(s)" in capsys.readouterr().out
    out3 = folder / "ais3d.tif"
    assert main(["segment", str(folder / "vol.tif"), "--model", str(decoder_checkpoint), "--mode", "ais",
                 "--axes", "ZYX", "--min-area", "5", "--out", str(out3)]) == 0
    got3 = tifffile.imread(out3)
    expected3 = Annotator(volume, str(decoder_checkpoint), axes="ZYX", cache=False).segment_everything(
        mode="ais", whole_volume=True, commit=False, progress=False, min_size=5)
    assert got3.shape == (2, 64, 80)
    np.testing.assert_array_equal(got3, expected3)
    assert any((got3 == i).any(axis=(1, 2)).sum() > 1 for i in range(1, int(got3.max()) + 1))  # linked through z


def test_a_time_series_of_stacks_gets_ids_unique_over_the_image(images, tiny_checkpoint):
    folder, volume = images
    tifffile.imwrite(folder / "tzyx.tif", np.stack([volume, volume[::-1]]), photometric="minisblack")
    out = folder / "boxes.tif"
    assert main(["segment", str(folder / "tzyx.tif"), "--model", str(tiny_checkpoint), "--mode", "boxes",
                 "--detector", "otsu", "--axes", "TZYX", "--out", str(out)]) == 0
    got = tifffile.imread(out)
    assert got.shape == (2, 2, 64, 80)
    first, second = set(np.unique(got[0])) - {0}, set(np.unique(got[1])) - {0}
    assert first and second and not first & second  # time points are not linked to each other


def test_a_decoder_mode_without_a_decoder_names_models_that_have_one(images, tiny_checkpoint, capsys):
    folder, _ = images
    out = folder / "none.tif"
    for mode in ("ais", "apg"):
        rc = main(["segment", str(folder / "img.tif"), "--model", str(tiny_checkpoint), "--mode", mode,
                   "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1
        assert f"--mode {mode} needs a model with an instance decoder" in err and "vit_b_lm" in err
        assert not out.exists()
    rc = main(["segment", str(folder / "img.tif"), "--model", str(tiny_checkpoint), "--mode", "ais", "--detector",
               "log", "--out", str(out)])
    assert rc == 2 and "--detector chooses the boxes of --mode boxes" in capsys.readouterr().err


def test_augment_is_the_apis_augmented_ais_and_only_ais(images, decoder_checkpoint, tmp_path, capsys):
    folder, volume = images
    out = tmp_path / "aug.tif"
    assert main(["segment", str(folder / "img.tif"), "--model", str(decoder_checkpoint), "--mode", "ais",
                 "--augment", "--out", str(out)]) == 0
    ann = Annotator(volume[1], str(decoder_checkpoint), cache=False)
    expected = ann.segment_everything(mode="ais", commit=False, progress=False, augment=True)
    np.testing.assert_array_equal(tifffile.imread(out), expected)
    plain = ann.segment_everything(mode="ais", commit=False, progress=False)
    assert not np.array_equal(plain, expected)  # the views changed the maps
    capsys.readouterr()
    for mode in ("apg", "prompts"):
        rc = main(["segment", str(folder / "img.tif"), "--model", str(decoder_checkpoint), "--mode", mode,
                   "--augment", "--box", "5", "5", "30", "30", "--out", str(tmp_path / f"{mode}.tif")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and f"not of --mode {mode}" in err
        assert not (tmp_path / f"{mode}.tif").exists()


def test_evaluate_augment_adds_a_row(images, decoder_checkpoint, tiny_checkpoint, tmp_path, capsys):
    import json

    folder, volume = images
    data = tmp_path / "data"
    for sub in ("images", "labels"):
        (data / sub).mkdir(parents=True)
    tifffile.imwrite(data / "images" / "a.tif", volume[1])
    tifffile.imwrite(data / "labels" / "a.tif", (volume[1] > np.median(volume[1])).astype(np.uint16))
    report = tmp_path / "r.json"
    assert main(["evaluate", str(data), "--model", str(decoder_checkpoint), "--auto-modes", "ais", "--augment",
                 "--corrections", "0", "--max-objects", "1", "--json", str(report)]) == 0
    rows = [r for r in json.loads(report.read_text()) if r["kind"] == "automatic"]
    assert [(r["mode"], r.get("augment", False)) for r in rows] == [("ais", False), ("ais", True), ("baseline", False)]
    assert "(ais, augmented)" in capsys.readouterr().out
    rc = main(["evaluate", str(data), "--model", str(tiny_checkpoint), "--augment", "--corrections", "0"])
    assert rc == 2 and "--augment measures AIS" in capsys.readouterr().err
