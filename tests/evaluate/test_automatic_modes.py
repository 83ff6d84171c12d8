"""Every automatic mode measured beside the classical baseline: the rows, their figures,
times, settings, the choice of modes and its errors, the baseline's own instance
segmentation, the table and the command line."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import tifffile
import torch

from napari_sam.auto.grid import GridConfig
from napari_sam.auto.recommend import Recommended, recommended
from napari_sam.cli import main
from napari_sam.evaluate import (
    EvalPair,
    evaluate_automatic,
    evaluate_modes,
    format_table,
    instance_scores,
    iter_evaluate_modes,
    select_modes,
    watershed_instances,
    watershed_segmenter,
)
from napari_sam.model import SamConfig, ViTConfig, build_sam
from napari_sam.model.instance_decoder import InstanceDecoder, InstanceDecoderConfig
from tests.conftest import drain

SMALL = SamConfig(ViTConfig(32, 2, 2, (1,), img_size=256), name="small-test", image_size=256)
FAST = Recommended(mode="boxes", grid=GridConfig(points_per_side=4, pred_iou_thresh=0.0, stability_thresh=0.0))


def disks(shape, centres, radius, dark=False, seed=0):
    """A noisy plane of bright (or dark) disks and their labels 1..n."""
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint16)
    for i, (r, c) in enumerate(centres, start=1):
        labels[((rr - r) ** 2 + (cc - c) ** 2 <= radius**2) & (labels == 0)] = i
    rng = np.random.default_rng(seed)
    image = np.where(labels > 0, 200.0, 40.0) + rng.normal(0, 5, shape)
    if dark:
        image = 255 - image
    return np.clip(image, 0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module")
def pairs():
    a = disks((96, 96), [(20, 20), (20, 70), (70, 30), (70, 75)], 9)
    b = disks((80, 112), [(25, 25), (50, 80)], 11, seed=1)
    return [EvalPair(a[0], a[1], "four"), EvalPair(b[0], b[1], "two")]


@pytest.fixture(scope="module")
def small_sam():
    torch.manual_seed(0)
    return build_sam(SMALL)


@pytest.fixture(scope="module")
def decoder_sam():
    torch.manual_seed(1)
    model = build_sam(SMALL)
    model.instance_decoder = InstanceDecoder(InstanceDecoderConfig(initial_features=4)).eval()
    return model


def check_row(row, pairs, mode):
    assert row["kind"] == "automatic" and row["mode"] == mode and row["images"] == len(pairs)
    assert [r["name"] for r in row["per_image"]] == [p.name for p in pairs]
    for key in ("msa", "ap50", "ap75"):
        assert math.isfinite(row[key]) and 0 <= row[key] <= 1
        assert row[key] == pytest.approx(np.mean([r[key] for r in row["per_image"]]))
    assert all(r["seconds"] > 0 for r in row["per_image"])
    assert row["seconds_per_plane"] == pytest.approx(np.mean([r["seconds"] for r in row["per_image"]]))
    assert [r["n_gt"] for r in row["per_image"]] == [len(np.unique(p.labels)) - 1 for p in pairs]


def test_every_offered_mode_is_reported_beside_the_baseline(small_sam, pairs):
    reports, rows = drain(iter_evaluate_modes(pairs, small_sam, advice=FAST))
    assert [(r.done, r.total, r.name) for r in reports] == [(1, 2, "four"), (2, 2, "two")]
    assert [r["mode"] for r in rows] == ["auto", "boxes", "baseline"]  # no decoder: no AIS, APG
    for row in rows:
        check_row(row, pairs, row["mode"])
    auto, boxes, base = rows
    assert auto["method"] == "small-test (auto)" and boxes["method"] == "small-test (boxes recommended)"
    assert boxes["recommended"] and not auto["recommended"] and not base["recommended"]
    # each mode runs with the advice's settings, and says so
    assert auto["settings"] == dataclasses.asdict(FAST.grid)
    assert auto["settings_text"] == "4^2 points, IoU > 0, stability > 0"
    assert boxes["settings"]["detector"] == "otsu" and "otsu detector" in boxes["settings_text"]
    # one embedding per image, shared by SAM's modes; the baseline embeds nothing
    assert auto["embedding_seconds_per_plane"] == boxes["embedding_seconds_per_plane"] > 0
    assert "embedding_seconds_per_plane" not in base
    # the baseline's row is exactly what it scores alone
    alone = evaluate_automatic(pairs, watershed_segmenter(), name="alone")
    assert [r["msa"] for r in alone["per_image"]] == [r["msa"] for r in base["per_image"]]
    json.dumps(rows)  # written by --json as they are


def test_the_models_own_advice_is_used_without_one(small_sam, pairs):
    rows = evaluate_modes(pairs[:1], small_sam, "boxes", baseline=False)
    assert [r["mode"] for r in rows] == ["boxes"]
    advice = recommended(small_sam)
    assert rows[0]["recommended"] == (advice.mode == "boxes")
    assert rows[0]["settings"]["detector"] == advice.detector


def test_decoder_modes_come_first_with_an_instance_decoder(decoder_sam, pairs):
    assert select_modes(decoder_sam) == ("ais", "apg", "auto", "boxes")
    rows = evaluate_modes(pairs, decoder_sam, ["boxes", "ais"], advice=FAST)
    assert [r["mode"] for r in rows] == ["ais", "boxes", "baseline"]  # display order, not the order asked
    for row in rows:
        check_row(row, pairs, row["mode"])
    assert rows[0]["settings"] == dataclasses.asdict(FAST.ais)
    assert rows[0]["settings_text"].startswith("centre < 0.5, boundary < 0.5")
    every = evaluate_modes(pairs[:1], decoder_sam, advice=FAST, baseline=False)
    assert [r["mode"] for r in every] == ["ais", "apg", "auto", "boxes"]
    for row in every:
        check_row(row, pairs[:1], row["mode"])
    assert every[1]["settings"] == dataclasses.asdict(FAST.apg)


def test_choosing_modes_and_its_errors(small_sam, decoder_sam, pairs):
    assert select_modes(small_sam) == ("auto", "boxes")
    assert select_modes(small_sam, " boxes, auto,boxes") == ("auto", "boxes")
    assert select_modes(None) == ()
    with pytest.raises(ValueError, match="unknown automatic mode 'grid'; the modes are ais, apg, auto, boxes"):
        select_modes(small_sam, "auto,grid")
    with pytest.raises(ValueError, match="'ais' needs an instance decoder.*its modes are auto, boxes"):
        evaluate_modes(pairs, small_sam, "ais")
    with pytest.raises(ValueError, match="no automatic mode given"):
        select_modes(decoder_sam, " , ")
    with pytest.raises(ValueError, match="need a model"):
        select_modes(None, "boxes")
    with pytest.raises(ValueError, match="nothing to measure"):
        evaluate_modes(pairs, None, baseline=False)
    volume = EvalPair(np.zeros((2, 8, 8), np.uint8), np.zeros((2, 8, 8), np.uint16), "vol")
    with pytest.raises(ValueError, match="vol: automatic modes are measured on 2D planes"):
        evaluate_modes([volume], None)
    # without a model: the baseline alone
    assert [r["mode"] for r in evaluate_modes(pairs, None)] == ["baseline"]


def test_baseline_instances_find_bright_and_dark_objects():
    # two touching disks must come out as two objects
    image, labels = disks((64, 96), [(32, 30), (32, 52), (12, 80)], 10)
    found = watershed_instances(image)
    assert found.dtype == np.uint32 and found.max() == 3
    np.testing.assert_array_equal(np.unique(found), [0, 1, 2, 3])
    assert instance_scores(labels, found)["ap50"] == 1.0
    dark, _ = disks((64, 96), [(32, 30), (32, 52), (12, 80)], 10, dark=True)
    assert instance_scores(labels, watershed_instances(dark))["ap50"] == 1.0
    rgb = np.repeat(dark[..., None], 3, axis=-1)  # H&E-like: dark nuclei in RGB
    assert instance_scores(labels, watershed_instances(rgb))["ap50"] == 1.0
    # colour: H&E (purple nuclei on pink) by its haematoxylin, a fluorescence composite
    # (green nuclei on black) by its brightness, as the models' stain rule tells them apart
    inside = labels > 0
    stained = np.where(inside[..., None], np.uint8([110, 60, 150]), np.uint8([235, 185, 205]))
    assert instance_scores(labels, watershed_instances(stained))["ap50"] == 1.0
    composite = np.zeros(labels.shape + (3,), np.uint8)
    composite[..., 1] = image
    composite[..., 2] = image // 4
    assert instance_scores(labels, watershed_instances(composite))["ap50"] == 1.0
    assert watershed_instances(np.full((20, 20), 7, np.uint8)).max() == 0
    # objects below min_area are dropped
    assert watershed_instances(image, min_area=400).max() == 0
    with pytest.raises(ValueError, match="2D plane"):
        watershed_instances(np.zeros((2, 3, 4, 5)))


def test_the_table_shows_times_and_settings(small_sam, pairs):
    rows = evaluate_modes(pairs[:1], small_sam, "boxes", advice=FAST)
    table = format_table(rows)
    assert "| method | images | mSA | AP50 | AP75 | s/plane | embed s/plane | settings |" in table
    assert "| small-test (boxes recommended) | 1 |" in table and "otsu detector, min area 25 |" in table
    base = next(line for line in table.splitlines() if line.startswith("| watershed baseline |"))
    assert base.split(" | ")[6] == "-"  # no embedding
    # results without times (older JSON) still print
    assert "| old | 1 | 0.500 | 0.500 | 0.500 | - | - | - |" in format_table(
        {"kind": "automatic", "method": "old", "images": 1, "msa": 0.5, "ap50": 0.5, "ap75": 0.5})


def test_cli_auto_modes(tmp_path, tiny_checkpoint, pairs, capsys):
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    for p in pairs[:1]:  # one image: the tiny checkpoint's 1024-pixel input is what costs
        tifffile.imwrite(tmp_path / "images" / f"{p.name}.tif", p.image)
        tifffile.imwrite(tmp_path / "labels" / f"{p.name}.tif", p.labels)
    report = tmp_path / "r.json"
    assert main(["evaluate", str(tmp_path), "--model", str(tiny_checkpoint), "--auto-modes", "boxes",
                 "--max-objects", "1", "--corrections", "1", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "| tiny_sam.pth (boxes" in out and "| watershed baseline | 1 |" in out
    rows = [r for r in json.loads(report.read_text()) if r["kind"] == "automatic"]
    assert [r["mode"] for r in rows] == ["boxes", "baseline"]
    assert all(r["seconds_per_plane"] > 0 and len(r["per_image"]) == 1 for r in rows)
    # an unknown mode is one line, before any work
    assert main(["evaluate", str(tmp_path), "--model", str(tiny_checkpoint), "--auto-modes", "grid"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("napari-sam evaluate: error: unknown automatic mode 'grid'; "
                           "the modes are ais, apg, auto, boxes")
    # no model: the baseline alone
    assert main(["evaluate", str(tmp_path), "--auto"]) == 0
    assert "| watershed baseline | 1 |" in capsys.readouterr().out
