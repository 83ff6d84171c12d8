"""Evaluation: the metrics against hand-computed values, loading pairs, the prompted
evaluation end to end (SAM with the tiny model, and the baseline), automatic and
propagation evaluation, and the table."""

import json

import numpy as np
import pytest

from napari_sam.core.predictor import Predictor
from napari_sam.core.prompts import Prompt
from napari_sam.evaluate import (
    EvalPair,
    WatershedBaseline,
    evaluate_automatic,
    evaluate_prompted,
    evaluate_propagation,
    evaluate_propagation_volumes,
    format_table,
    instance_scores,
    iter_evaluate_prompted,
    load_pairs,
    mean_segmentation_accuracy,
    pairs_from_arrays,
    segmentation_accuracy,
)
from tests.conftest import drain

# -- metrics ---------------------------------------------------------------------------------


@pytest.fixture
def gt_and_pred():
    gt = np.zeros((40, 40), np.uint16)
    gt[0:10, 0:10] = 1  # A
    gt[20:30, 20:30] = 2  # B
    pred = np.zeros((40, 40), np.int32)
    pred[0:10, 1:11] = 7  # A shifted by a column: IoU 90 / 110 = 0.818
    pred[20:30, 20:25] = 3  # half of B: IoU 50 / 100 = 0.5, not above 0.5
    pred[35:38, 35:38] = 9  # nothing there
    return gt, pred


def test_accuracy_at_a_threshold_by_hand(gt_and_pred):
    gt, pred = gt_and_pred
    # TP = 1 (A), FP = 2, FN = 1: 1 / 4
    assert segmentation_accuracy(gt, pred, 0.5) == pytest.approx(0.25)
    assert segmentation_accuracy(gt, pred, 0.75) == pytest.approx(0.25)
    # above A's IoU: TP = 0, FP = 3, FN = 2
    assert segmentation_accuracy(gt, pred, 0.85) == 0.0
    # below 0.5 the half of B matches too (one-to-one): TP = 2, FP = 1, FN = 0
    assert segmentation_accuracy(gt, pred, 0.3) == pytest.approx(2 / 3)


def test_mean_segmentation_accuracy_by_hand(gt_and_pred):
    gt, pred = gt_and_pred
    # A matches for t = 0.50 ... 0.80 (7 of the 10 thresholds), at 0.25 each
    assert mean_segmentation_accuracy(gt, pred) == pytest.approx(7 * 0.25 / 10)
    scores = instance_scores(gt, pred)
    assert scores == pytest.approx({"msa": 0.175, "ap50": 0.25, "ap75": 0.25, "n_gt": 2, "n_pred": 3})


def test_metric_edge_cases(gt_and_pred):
    gt, _ = gt_and_pred
    relabelled = np.where(gt > 0, gt + 40, 0).astype(np.int64)  # ids do not matter
    assert mean_segmentation_accuracy(gt, relabelled) == 1.0
    empty = np.zeros_like(gt)
    assert mean_segmentation_accuracy(empty, empty) == 1.0
    assert mean_segmentation_accuracy(gt, empty) == 0.0
    assert segmentation_accuracy(empty, gt, 0.5) == 0.0
    with pytest.raises(ValueError, match="shape"):
        segmentation_accuracy(gt, gt[:5])
    with pytest.raises(ValueError, match="integer"):
        segmentation_accuracy(gt, gt.astype(float))


# -- data -----------------------------------------------------------------------------------


def test_pairs_from_the_shared_folder(shared_dir):
    pairs = load_pairs(shared_dir / "data" / "dsb2018_fluo")
    assert len(pairs) == 21
    for p in pairs:
        assert p.image.shape[:2] == p.labels.shape and p.labels.max() > 0


def test_pairs_from_zarr_and_arrays(tmp_path):
    import zarr

    images = np.random.default_rng(0).integers(0, 255, (2, 16, 20), dtype=np.uint8)
    labels = np.zeros((2, 16, 20), np.uint16)
    labels[:, 2:6, 3:9] = 1
    group = zarr.open_group(str(tmp_path / "pairs.zarr"), mode="w")
    group.create_array("images", data=images)
    group.create_array("labels", data=labels)
    pairs = load_pairs(tmp_path / "pairs.zarr")
    assert len(pairs) == 2
    np.testing.assert_array_equal(pairs[1].image, images[1])
    np.testing.assert_array_equal(pairs[1].labels, labels[1])
    assert len(load_pairs([(images[0], labels[0])])) == 1
    assert [p.name for p in pairs_from_arrays(images, labels, ["a", "b"])] == ["a", "b"]
    with pytest.raises(ValueError, match="same pixels"):
        load_pairs([(images[0], labels[0, :5])])
    (tmp_path / "f" / "images").mkdir(parents=True)
    (tmp_path / "f" / "labels").mkdir()
    import tifffile

    tifffile.imwrite(tmp_path / "f" / "images" / "x.tif", images[0])
    with pytest.raises(ValueError, match="no label file"):
        load_pairs(tmp_path / "f")
    # images and labels in two folders of their own
    tifffile.imwrite(tmp_path / "f" / "labels" / "x.tif", labels[0])
    two = load_pairs(tmp_path / "f" / "images", tmp_path / "f" / "labels")
    assert [p.name for p in two] == ["x"]
    np.testing.assert_array_equal(two[0].labels, labels[0])
    with pytest.raises(ValueError, match="no folder"):
        load_pairs(tmp_path / "f" / "images", tmp_path / "nothing")


# -- prompted -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_pair(nuclei_2d):
    image, labels = nuclei_2d
    return image[:96, :96], labels[:96, :96]


def test_prompted_evaluation_with_sam_end_to_end(tiny_sam, small_pair):
    result = evaluate_prompted([small_pair], Predictor(tiny_sam), n_corrections=2, max_objects=3, seed=1)
    assert result["kind"] == "prompted" and result["method"] == "sam"
    assert result["images"] == 1 and result["objects"] == 3
    assert len(result["iterative"]) == 3  # the point alone, then 2 corrections
    values = [result["point"], result["box"], *result["iterative"]]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert result["iterative"][0] == pytest.approx(result["point"])
    assert result["per_image"][0]["objects"] == 3
    json.dumps(result)  # JSON-able


def test_planes_larger_than_the_model_input_are_evaluated_on_tiles(nuclei_2d):
    # A 256-pixel model on a 300x380 crop: the evaluation must answer each prompt as the
    # plugin does (Embeddings.segment over full-resolution tiles), not on a shrunken plane.
    import torch

    from napari_sam.core.embeddings import Embeddings
    from napari_sam.core.prompt_simulation import interior_point
    from napari_sam.model import SamConfig, ViTConfig, build_sam

    torch.manual_seed(3)
    model = build_sam(SamConfig(ViTConfig(32, 2, 2, (1,), window_size=8, img_size=256), image_size=256)).eval()
    image, labels = nuclei_2d[0][:300, :380], nuclei_2d[1][:300, :380]
    result = evaluate_prompted([(image, labels)], Predictor(model), n_corrections=1, max_objects=3, seed=2)
    assert result["objects"] == 3 and len(result["iterative"]) == 2

    # the sample of image 1 with seed 2 is drawn from its own stream, default_rng([2, 1])
    ids = np.random.default_rng([2, 1]).choice(np.unique(labels[labels > 0]), 3, replace=False)
    emb = Embeddings(image, model, cache=False, axes="YX", statistics="plane")
    expected = []
    for i in np.sort(ids):
        gt = labels == i
        mask = emb.segment(0, Prompt.make(interior_point(gt)[None], [1]), multimask=True).to_full(gt.shape)
        expected.append((mask & gt).sum() / (mask | gt).sum())
    assert result["point"] == pytest.approx(np.mean(expected))
    whole = Predictor(model)
    whole.set_image(image)  # the shrunken whole plane answers differently
    shrunk = [whole.predict(points=interior_point(labels == i)[None], labels=[1]).best_mask() for i in np.sort(ids)]
    assert not all(
        np.array_equal(a, emb.segment(0, Prompt.make(interior_point(labels == i)[None], [1])).to_full(a.shape))
        for a, i in zip(shrunk, np.sort(ids))
    )


def test_a_model_that_answers_objects_at_their_scale_is_measured_through_that_rule(nuclei_2d, monkeypatch):
    # The Annotator answers every prompt of such a model through segment_at_object_scale,
    # on planes of one tile too; the evaluation must measure that, not the batched
    # predictor (which once hid that boxes moved on the GoNuclear planes).
    import torch

    from napari_sam.evaluate import prompted
    from napari_sam.model import SamConfig, ViTConfig, build_sam

    torch.manual_seed(3)
    model = build_sam(SamConfig(ViTConfig(32, 2, 2, (1,), window_size=8, img_size=256), image_size=256)).eval()
    model.metadata = {"scale": {"object_diameter": 30.0, "box_diameter": 36.0}}
    calls = []
    rule = prompted.segment_at_object_scale
    monkeypatch.setattr(prompted, "segment_at_object_scale", lambda *a, **k: calls.append(a[2]) or rule(*a, **k))
    image, labels = nuclei_2d[0][:120, :120], nuclei_2d[1][:120, :120]  # one tile at any magnification
    result = evaluate_prompted([(image, labels)], Predictor(model), n_corrections=2, max_objects=3, seed=2)
    assert result["objects"] == 3
    boxes = [p for p in calls if p.box is not None]
    corrections = [p for p in calls if p.previous is not None]
    assert len(boxes) == 3 and len(calls) - len(boxes) - len(corrections) == 3  # the clicks
    assert 0 < len(corrections) <= 6
    calls.clear()
    model.metadata = {}  # SAM's own weights: the batched predictor, as before
    evaluate_prompted([(image, labels)], Predictor(model), n_corrections=2, max_objects=3, seed=2)
    assert calls == []


def test_the_batched_evaluation_answers_corrections_as_the_annotator_does(nuclei_2d, monkeypatch):
    # SAM's own weights on a plane of one tile go through the batched predictor: each
    # correction must still get the Annotator's choice of a mask that honours its clicks,
    # and that mask must be what is scored (here a choice of the true object: IoU 1).
    import torch

    from napari_sam.evaluate import prompted
    from napari_sam.model import SamConfig, ViTConfig, build_sam

    torch.manual_seed(3)
    model = build_sam(SamConfig(ViTConfig(32, 2, 2, (1,), window_size=8, img_size=256), image_size=256)).eval()
    image, labels = nuclei_2d[0][:120, :120], nuclei_2d[1][:120, :120]
    asked = []

    def the_true_object(single, ask, points, clicks, cell):
        assert cell == 120 / 64  # the plane's longest side over the low-res mask's side
        masks, predicted = ask()  # the predictor really asked again, for three masks
        assert len(masks) == len(predicted) == 3 and masks[0].shape == single.shape == labels.shape
        asked.append(clicks.tolist())
        x, y = points[0]
        chosen = type("Chosen", (list,), {})([labels == labels[int(y), int(x)]])
        chosen.low_res_logits = masks.low_res_logits
        return chosen, 0, 1.0

    monkeypatch.setattr(prompted, "honouring_choice", the_true_object)
    result = evaluate_prompted([(image, labels)], Predictor(model), n_corrections=2, max_objects=3, seed=2)
    assert len(asked) == 3 and all(len(c) == 2 for c in asked)  # each object's first correction
    assert result["iterative"][0] < 0.9 and result["iterative"][1:] == [1.0, 1.0]


def test_prompted_evaluation_with_the_baseline(small_pair):
    _, labels = small_pair
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    gen = iter_evaluate_prompted([small_pair, small_pair], WatershedBaseline(), n_corrections=3, min_area=10)
    reports, result = drain(gen)
    assert [(r.done, r.total) for r in reports] == [(1, 2), (2, 2)]
    assert result["method"] == "watershed"
    assert result["objects"] == 2 * int((counts >= 10).sum())  # every object, both images
    # real nuclei: the classical method gets most of them, and corrections help
    assert result["point"] > 0.5 and result["box"] > 0.5
    assert result["iterative"][-1] >= result["iterative"][0]
    # a sample is reproducible
    a = evaluate_prompted([small_pair], WatershedBaseline(), n_corrections=1, max_objects=2, seed=3)
    b = evaluate_prompted([small_pair], WatershedBaseline(), n_corrections=1, max_objects=2, seed=3)
    assert a == b and a["objects"] == 2
    with pytest.raises(ValueError, match="Predictor"):
        evaluate_prompted([small_pair], object())


def test_a_sample_of_objects_does_not_depend_on_the_corrections(nuclei_2d):
    # Two methods compared with max_objects must meet the same objects on every image,
    # however many corrective clicks (random tie-breaks) the earlier images took: the box
    # answer does not depend on corrections, so each image's box figure must agree.
    image, labels = nuclei_2d
    pairs = [(image[:128, :128], labels[:128, :128]), (image[128:256, :128], labels[128:256, :128]),
             (image[:128, 128:256], labels[:128, 128:256])]
    runs = [evaluate_prompted(pairs, WatershedBaseline(), n_corrections=k, max_objects=3, seed=5) for k in (0, 4)]
    assert [p["objects"] for p in runs[0]["per_image"]] == [3, 3, 3]
    assert [p["box"] for p in runs[0]["per_image"]] == [p["box"] for p in runs[1]["per_image"]]


# -- automatic --------------------------------------------------------------------------------


def test_automatic_evaluation(gt_and_pred):
    gt, pred = gt_and_pred
    pairs = [EvalPair(np.zeros(gt.shape), gt, "one"), EvalPair(np.zeros(gt.shape), gt, "two")]
    perfect = evaluate_automatic(pairs, lambda image: gt.copy(), name="oracle")
    assert perfect["msa"] == perfect["ap50"] == perfect["ap75"] == 1.0 and perfect["images"] == 2
    half = evaluate_automatic(pairs, lambda image: pred, name="shifted")
    assert half["msa"] == pytest.approx(0.175) and half["ap50"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="shape"):
        evaluate_automatic(pairs, lambda image: gt[:10])
    table = format_table([perfect, half])
    assert "| oracle | 2 | 1.000 | 1.000 | 1.000 |" in table
    assert "| shifted | 2 | 0.175 | 0.250 | 0.250 |" in table
    empty = dict(half, method="nothing", msa=float("nan"), ap50=None)  # no object to score
    assert "| nothing | 2 | - | - | 0.250 |" in format_table(empty)


# -- propagation ------------------------------------------------------------------------------


@pytest.fixture
def volume_labels():
    labels = np.zeros((8, 20, 20), np.uint16)
    labels[2:7, 2:8, 2:8] = 3  # planes 2..6: the middle is 4
    labels[0:2, 10:15, 10:15] = 5  # planes 0..1: the middle is 1
    return np.random.default_rng(0).random(labels.shape), labels


def test_a_perfect_propagation_scores_one(volume_labels):
    volume, labels = volume_labels
    starts = {}

    def perfect(vol, start, mask):
        assert vol.shape == labels.shape and mask.shape == labels.shape[1:]
        obj = int(np.bincount(labels[start][mask]).argmax())
        starts[obj] = start
        return labels == obj

    result = evaluate_propagation(perfect, volume, labels)
    assert result["objects"] == 2 and result["mean_iou"] == 1.0
    assert starts == {3: 4, 5: 1}
    json.dumps(result)


def test_propagation_that_stays_on_its_plane(volume_labels):
    volume, labels = volume_labels

    def stay(vol, start, mask):
        out = np.zeros(vol.shape, bool)
        out[start] = mask
        return out

    result = evaluate_propagation(stay, volume, labels, name="stay")
    # one plane of five, and one of two
    assert [r["iou"] for r in result["per_object"]] == pytest.approx([1 / 5, 1 / 2])
    assert result["mean_iou"] == pytest.approx(0.35)
    assert "| stay | 2 | 0.350 |" in format_table(result)
    assert evaluate_propagation(stay, volume, labels, max_objects=1, seed=0)["objects"] == 1
    with pytest.raises(ValueError, match="shape"):
        evaluate_propagation(lambda v, s, m: m, volume, labels)


def test_propagation_over_several_volumes_weighs_every_object_alike(volume_labels):
    from napari_sam.evaluate import EvalPair

    volume, labels = volume_labels
    one = labels.copy()
    one[one == 5] = 0  # the second volume holds only the five-plane object

    def stay(vol, start, mask):
        out = np.zeros(vol.shape, bool)
        out[start] = mask
        return out

    result = evaluate_propagation_volumes(stay, [EvalPair(volume, labels, "a"), EvalPair(volume, one, "b")],
                                          name="stay")
    assert [o["volume"] for o in result["per_object"]] == ["a", "a", "b"]
    assert [o["iou"] for o in result["per_object"]] == pytest.approx([1 / 5, 1 / 2, 1 / 5])
    assert result["objects"] == 3 and result["mean_iou"] == pytest.approx((0.2 + 0.5 + 0.2) / 3)
    assert result["kind"] == "propagation" and result["method"] == "stay"
    assert evaluate_propagation_volumes(stay, [])["objects"] == 0
