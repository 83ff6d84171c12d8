"""`napari-sam propagate` and `napari-sam evaluate` with a SAM 2.1 checkpoint: propagation
with memory end to end, on the randomised reference model saved as a checkpoint that
records its configuration (its quality means nothing; the files, ids and planes do)."""

import dataclasses
import json

import numpy as np
import pytest
import tifffile
import torch

from napari_sam.cli import main
from napari_sam.core.embedding_store import describe_cache


@pytest.fixture(scope="module")
def sam2_checkpoint(tmp_path_factory):
    """The reference set's SAM 2 at a 128-pixel input, as a checkpoint file."""
    from napari_sam.model.checkpoint import write_checkpoint
    from napari_sam.model.sam2 import config_from_official, config_to_dict
    from tests.core.test_memory_propagation import REFERENCE

    config = config_from_official(json.loads((REFERENCE / "config.json").read_text()), name="sam2_small_seed0")
    state = torch.load(REFERENCE / "weights.pth", map_location="cpu", weights_only=True)["model"]
    path = tmp_path_factory.mktemp("sam2") / "small_sam2.pth"
    write_checkpoint(path, state, metadata={"config": config_to_dict(dataclasses.replace(config, image_size=128))})
    return path


def test_propagate_with_a_sam2_checkpoint_writes_every_object_from_its_drawn_planes(tmp_path, sam2_checkpoint,
                                                                                      nuclei_3d, capsys):
    image, gt = nuclei_3d
    image, gt = image[40:50, :64, :64], gt[40:50, :64, :64]
    tifffile.imwrite(tmp_path / "vol.tif", image)
    ids = [i for i in np.unique(gt[5])[1:] if (gt[5] == i).sum() > 40 and (gt[8] == i).sum() > 40][:2]
    assert len(ids) == 2
    seeds = np.zeros(gt.shape, np.uint16)
    for k, i in enumerate(ids, start=1):
        seeds[5][gt[5] == i] = k
    seeds[8][gt[8] == ids[0]] = 1  # object 1 is drawn on a second plane
    tifffile.imwrite(tmp_path / "seeds.tif", seeds)
    out, cache = tmp_path / "out.tif", tmp_path / "cache.zarr"
    args = ["propagate", str(tmp_path / "vol.tif"), str(tmp_path / "seeds.tif"), "--model", str(sam2_checkpoint),
            "--out", str(out), "--cache", str(cache)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "memory of sam2_small_seed0 (SAM 2)" in printed
    assert "object 1: written on" in printed and "object 2: written on" in printed
    result = tifffile.imread(out)
    assert result.shape == gt.shape and set(np.unique(result)) <= {0, 1, 2}
    np.testing.assert_array_equal(result[5], seeds[5])  # drawn planes are the user's
    np.testing.assert_array_equal(result[8] == 1, seeds[8] == 1)  # object 1's own; object 2 may fill around it
    written = {k: [z for z in range(10) if (result[z] == k).any()] for k in (1, 2)}
    assert len(written[2]) > 1 and len(written[1]) > 2
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "seeds.tif"), seeds)  # seeds left as they are
    [entry] = describe_cache(cache)  # SAM 2's features of every plane, cached
    assert entry["present"] == entry["total"] == 10


def test_evaluate_measures_sam2_propagation_beside_the_watershed(tmp_path, sam2_checkpoint, nuclei_3d, capsys):
    image, labels = nuclei_3d[0][30:40, :48, :48], nuclei_3d[1][30:40, :48, :48]
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    tifffile.imwrite(tmp_path / "images" / "v.tif", image)
    tifffile.imwrite(tmp_path / "labels" / "v.tif", labels)
    report = tmp_path / "r.json"
    assert main(["evaluate", str(tmp_path), "--model", str(sam2_checkpoint), "--baseline", "--max-objects", "2",
                 "--json", str(report)]) == 0
    assert "mean 3D IoU" in capsys.readouterr().out
    results = json.loads(report.read_text())
    assert [r["method"] for r in results] == ["small_sam2.pth (propagation)", "watershed baseline (propagation)"]
    for r in results:
        assert r["kind"] == "propagation" and r["objects"] == 2 and 0 <= r["mean_iou"] <= 1
    # SAM 2 is measured on volumes: a folder of 2D planes is refused in one line
    flat = tmp_path / "flat"
    for sub in ("images", "labels"):
        (flat / sub).mkdir(parents=True)
    tifffile.imwrite(flat / "images" / "p.tif", image[5])
    tifffile.imwrite(flat / "labels" / "p.tif", labels[5])
    assert main(["evaluate", str(flat), "--model", str(sam2_checkpoint)]) == 2
    assert "measured on 3D label volumes" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--model", str(sam2_checkpoint), "--auto"]) == 2
    assert "is a SAM 2" in capsys.readouterr().err
    rgb = tmp_path / "rgb"  # a stain it does not read is refused, not silently dropped
    for sub in ("images", "labels"):
        (rgb / sub).mkdir(parents=True)
    tifffile.imwrite(rgb / "images" / "v.tif", np.repeat(np.asarray(image)[..., None], 3, -1), photometric="rgb")
    tifffile.imwrite(rgb / "labels" / "v.tif", labels)
    assert main(["evaluate", str(rgb), "--model", str(sam2_checkpoint), "--channel", "haematoxylin"]) == 2
    assert "is a SAM 2, which reads RGB as its colours" in capsys.readouterr().err
    assert main(["evaluate", str(rgb), "--model", str(sam2_checkpoint), "--channel", "rgb", "--max-objects", "1"]) == 0
    assert "(propagation) | 1 |" in capsys.readouterr().out


@pytest.mark.parametrize("extra, seeds_empty, said", [
    (["--axis", "T"], False, "--axis T: the image's plane axes are 'Z'"),
    (["--ids", "5"], False, "no object [5] in the labels"),
    ([], True, "hold no object to propagate"),
])
def test_propagate_refuses_a_bad_request_before_the_model_loads(tmp_path, monkeypatch, capsys, extra, seeds_empty,
                                                               said):
    import napari_sam.api

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(napari_sam.api, "split_models", never)
    tifffile.imwrite(tmp_path / "vol.tif", np.zeros((6, 32, 32), np.uint8))
    seeds = np.zeros((6, 32, 32), np.uint16)
    if not seeds_empty:
        seeds[1, 5:10, 5:10] = 1
    tifffile.imwrite(tmp_path / "seeds.tif", seeds)
    args = ["propagate", str(tmp_path / "vol.tif"), str(tmp_path / "seeds.tif"), "--model", "sam2.1_hiera_tiny",
            "--out", str(tmp_path / "out.tif"), *extra]
    assert main(args) == 2
    assert said in capsys.readouterr().err and not (tmp_path / "out.tif").exists()
    with pytest.raises(SystemExit):  # --ids names at least one object
        main(args[:7] + ["--ids"])
