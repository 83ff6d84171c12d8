"""APG: micro-sam's automatic prompt generation, its prompts, its filters and its tiled run.

Prompts and filters are compared with micro-sam's own ``AutomaticPromptGenerator.generate``
on the reference sets in ``tests/reference/apg/`` (made by
``scripts/make_apg_reference.py`` with a stand-in for SAM whose answers both sides
compute; sets under ``$NAPARI_SAM_REFERENCE_DIR/apg/`` are tested too), and on planes
with known objects; the whole mode runs on a small random SAM with a random instance
decoder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_sam.auto.apg import APGSettings, iter_apg, prompt_points, segment_apg, select_masks
from napari_sam.auto.boxes import iter_tile_prompts
from napari_sam.auto.candidates import Candidate, stability_score
from napari_sam.auto.decoding import decoder as predictor_of
from napari_sam.auto.decoding import full_logits
from napari_sam.core.embeddings import Embeddings
from napari_sam.core.masks import PlaneMask
from napari_sam.model.config import SamConfig, ViTConfig
from napari_sam.model.instance_decoder import InstanceDecoder, InstanceDecoderConfig
from napari_sam.model.sam import build_sam
from napari_sam.train.instance_targets import instance_targets
from tests.auto.test_ais import discs
from tests.conftest import drain

REPO = Path(__file__).resolve().parents[2]
OWN_SETS = REPO / "tests" / "reference" / "apg"
REFERENCE_DIR = Path(os.environ.get("NAPARI_SAM_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
SETS = sorted(p.parent for folder in (OWN_SETS, REFERENCE_DIR / "apg") for p in folder.glob("*/meta.json"))
# a SAM of 256-pixel input (16 x 16 embeddings, as the default model): fast on a CPU
SMALL = SamConfig(ViTConfig(32, 2, 2, (1,), window_size=4, img_size=256), name="small-apg-test", image_size=256)


def small_model_with_decoder():
    """A small random SAM carrying a narrow random instance decoder (eval mode)."""
    torch.manual_seed(0)
    model = build_sam(SMALL).eval()
    torch.manual_seed(3)
    decoder = InstanceDecoder(InstanceDecoderConfig(initial_features=4))
    with torch.no_grad():
        for name, buf in decoder.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.2)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    model.instance_decoder = decoder.eval()
    return model


class KnownMaps:
    """A stand-in for an instance decoder that answers tiles, in the order the automatic
    modes decode them (plane after plane, tile after tile, one at a time), with crops of
    known (3, H, W) maps, one per plane."""

    training = False

    def __init__(self, planes_maps, grid):
        planes_maps = np.asarray(planes_maps, np.float32)
        self.queue = [(m, tile.outer) for m in planes_maps.reshape(-1, *planes_maps.shape[-3:]) for tile in grid]

    def maps(self, batch):
        return batch

    def resize(self, maps, input_size, original_size, image_size):
        plane_maps, (y0, y1, x0, x1) = self.queue.pop(0)
        assert (y1 - y0, x1 - x0) == tuple(original_size)
        return torch.as_tensor(plane_maps[:, y0:y1, x0:x1])[None]


def bright_discs(shape, centres, radii):
    """Discs (1..n) and an image of them: bright discs on a dark, noisy background."""
    truth = discs(shape, centres, radii)
    rng = np.random.default_rng(0)
    image = np.where(truth > 0, 200, 30) + rng.integers(0, 20, shape)
    return truth, image.astype(np.uint8)


# --- parity with micro-sam on the reference sets ---------------------------------------


def stand_in_answer(instances: np.ndarray, x: int, y: int) -> tuple[np.ndarray, float]:
    """The stand-in SAM of scripts/make_apg_reference.py (must stay equal to it)."""
    shift = ((x * 7919 + y * 104729) % 1000) / 1000 * 3 - 1.5
    iou = 0.55 + ((x * 104723 + y * 7907) % 997) / 997 * 0.4
    obj = int(instances[y, x])
    if obj:
        inside = instances == obj
        logits = ndi.distance_transform_edt(inside) - ndi.distance_transform_edt(~inside) - 0.5 + shift
    else:
        rows, cols = np.indices(instances.shape)
        logits = 6.0 - np.hypot(rows - y, cols - x)
    return logits.astype(np.float32), float(iou)


def test_committed_reference_sets_are_found():
    assert {"seed0", "seed2_dense"} <= {p.name for p in SETS}


@pytest.fixture(scope="module", params=SETS, ids=[p.name for p in SETS])
def reference(request):
    data = np.load(request.param / "data.npz")
    return {k: data[k] for k in data.files}, json.loads((request.param / "meta.json").read_text())


def test_prompts_are_micro_sams(reference):
    data, meta = reference
    maps = data["maps"].astype(np.float32)
    points = prompt_points(*maps)
    assert len(points) == meta["prompts"] > 10
    np.testing.assert_array_equal(points, data["points"])


def test_labels_match_micro_sams_generate(reference):
    data, meta = reference
    instances = data["instances"]
    candidates = []
    for x, y in data["points"]:
        logits, iou = stand_in_answer(instances, int(x), int(y))
        stability = float(stability_score(logits, 1.0, 0.0))
        candidates.append(Candidate.of(logits > 0, (0, 0), iou, stability))
    for case, spec in meta["cases"].items():
        expected = data[f"labels_{case}"]
        labels = select_masks(instances.shape, candidates, APGSettings(**spec["generate"]))
        assert labels.dtype == np.uint32 and expected.max() > 10
        np.testing.assert_array_equal(labels, expected, err_msg=case)


# --- prompts and filters on known objects ------------------------------------------------


def test_one_point_per_object_at_its_deepest_pixel():
    truth = discs((80, 120), [(30, 30), (40, 80), (75, 110)], [12, 15, 9])  # the last leaves the plane
    points = prompt_points(*instance_targets(truth))
    assert points.shape == (3, 2) and points.dtype == np.float64
    for x, y in points[:2]:
        assert truth[int(y), int(x)] in (1, 2)
    np.testing.assert_allclose(points[:2], [(30, 30), (80, 40)], atol=1.5)
    x, y = points[2]
    assert truth[int(y), int(x)] == 3 and 0 < x < 119 and 0 < y < 79  # never on the plane's border
    assert prompt_points(*np.ones((3, 20, 30), np.float32)).shape == (0, 2)  # foreground, no seed


def _square(y0, y1, x0, x1, iou, stability=1.0, shape=(60, 60)):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return Candidate.of(mask, (0, 0), iou, stability)


def test_duplicates_are_suppressed_by_mask_overlap_and_larger_masks_are_painted_first():
    big = _square(10, 30, 10, 30, 0.9)                  # 400 pixels
    shifted = _square(11, 31, 10, 30, 0.8)              # IoU 380/420 = 0.905 with big: a duplicate
    inside = _square(15, 21, 15, 21, 0.95)              # 36 pixels on big: big keeps its pixels
    across = _square(25, 35, 20, 45, 0.85)              # big takes its top-left corner
    cut = _square(40, 50, 0, 60, 0.7)                   # 600 pixels, painted before `splits`
    splits = _square(33, 57, 28, 34, 0.6)               # cut in two by `cut`: two objects
    tiny = _square(0, 2, 50, 60, 0.99)                  # 20 pixels <= min_size 25: dropped
    labels = select_masks((60, 60), [big, shifted, inside, across, cut, splits, tiny])
    assert labels.dtype == np.uint32 and labels.shape == (60, 60)
    np.testing.assert_array_equal(np.unique(labels), np.arange(6))  # big, across, cut, two pieces
    assert len(np.unique(labels[10:30, 10:30])) == 1 and labels[10, 10] > 0  # big whole, nothing on it
    assert labels[30, 10] == 0  # the shifted duplicate's extra row stays empty
    assert (labels == labels[27, 40]).sum() == 10 * 25 - 5 * 10
    assert labels[36, 30] != labels[52, 30] and 0 not in (labels[36, 30], labels[52, 30])
    assert labels[1, 55] == 0
    # ids in row-major order of first pixels
    firsts = [np.flatnonzero(labels.ravel() == i)[0] for i in range(1, 6)]
    assert firsts == sorted(firsts)
    # a lower threshold makes `across` (IoU 50 / 600 with big) a duplicate too
    loose = select_masks((60, 60), [big, across], APGSettings(nms_threshold=0.05))
    assert loose.max() == 1
    # over the union `inside` is no duplicate of big (and then vanishes under it when
    # painted); over the smaller mask it is, and as it scores higher, big goes
    labels = select_masks((60, 60), [inside, big], APGSettings(min_size=0, nms_threshold=0.5))
    assert labels.max() == 1 and (labels > 0).sum() == 400
    over_min = APGSettings(min_size=0, nms_threshold=0.5, intersection_over_min=True)
    labels = select_masks((60, 60), [inside, big], over_min)
    assert labels.max() == 1 and (labels > 0).sum() == 36
    assert select_masks((60, 60), []).max() == 0


def test_stability_counts_in_the_ranking_and_nan_means_none():
    a = _square(10, 30, 10, 30, 0.9, stability=0.5)     # score 0.45
    b = _square(11, 31, 10, 30, 0.6, stability=1.0)     # score 0.6: wins
    labels = select_masks((60, 60), [a, b])
    assert labels[30, 15] == 1 and labels[10, 15] == 0
    c = _square(10, 30, 10, 30, 0.7, stability=float("nan"))  # ranked by IoU alone: 0.7
    labels = select_masks((60, 60), [b, c])
    assert labels[10, 15] == 1 and labels[30, 15] == 0


def test_defaults_are_micro_sams():
    s = APGSettings()
    assert (s.center_distance_threshold, s.boundary_distance_threshold, s.foreground_threshold) == (0.5, 0.5, 0.5)
    assert (s.min_size, s.nms_threshold, s.intersection_over_min) == (25, 0.9, False)
    assert (s.multimask, s.refine_with_boxes, s.batch_size) == (False, False, 32)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"center_distance_threshold": float("nan")}, "center_distance_threshold"),
        ({"foreground_threshold": "0.5"}, "foreground_threshold"),
        ({"nms_threshold": 1.5}, "nms_threshold"),
        ({"min_size": -1}, "min_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"multimask": 1}, "multimask"),
    ],
)
def test_bad_settings_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        APGSettings(**kwargs)


# --- the mode on a SAM ------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return small_model_with_decoder()


def test_a_plane_is_sams_answer_to_each_prompt_filtered(model):
    truth, image = bright_discs((64, 80), [(20, 20), (40, 55), (50, 15)], [10, 12, 8])
    emb = Embeddings(image, model, cache=False)
    assert len(emb.grid) == 1
    settings = APGSettings(min_size=0)
    points = prompt_points(*instance_targets(truth), settings)
    assert len(points) == 3
    reports, labels = drain(iter_apg(emb, 0, KnownMaps(instance_targets(truth), emb.grid), settings))
    assert [(r.stage, r.done, r.total) for r in reports] == [("tiles", 1, 1), ("prompts", 3, 3)]
    # the same, asked directly: each point alone through SAM, then the filters
    predictor = predictor_of(emb)
    predictor.set_embedding(emb.embedding_for(0))
    pred = predictor.predict_batch(points=points[:, None, :], multimask=False)
    logits = full_logits(predictor, pred.low_res_logits[:, 0])
    stab = stability_score(logits, 1.0, 0.0)
    candidates = [Candidate.of(lg > 0, (0, 0), float(i), float(s)) for lg, i, s in zip(logits, pred.iou[:, 0], stab)]
    expected = select_masks((64, 80), [c for c in candidates if c is not None], settings)
    assert expected.max() >= 1
    np.testing.assert_array_equal(labels, expected)
    # several masks per point: the best by predicted IoU
    multi = segment_apg(emb, 0, KnownMaps(instance_targets(truth), emb.grid), APGSettings(min_size=0, multimask=True))
    pred = predictor.predict_batch(points=points[:, None, :], multimask=True)
    best = pred.iou.argmax(axis=1)
    logits = full_logits(predictor, pred.low_res_logits[np.arange(3), best])
    stab = stability_score(logits, 1.0, 0.0)
    candidates = [Candidate.of(lg > 0, (0, 0), float(i), float(s))
                  for lg, i, s in zip(logits, pred.iou[np.arange(3), best], stab)]
    np.testing.assert_array_equal(multi, select_masks((64, 80), [c for c in candidates if c is not None], settings))
    # refinement: each mask asked again with its box, on the same plane
    refined = segment_apg(emb, 0, KnownMaps(instance_targets(truth), emb.grid),
                          dataclasses.replace(settings, refine_with_boxes=True))
    assert refined.shape == (64, 80) and refined.dtype == np.uint32 and refined.max() >= 1


def test_tiled_plane(model):
    # the middle disc straddles the border of the two tiles' interiors
    truth, image = bright_discs((48, 90), [(24, 18), (24, 46), (24, 74)], [9, 10, 8])
    emb = Embeddings(image, model, cache=False, tile=48, halo=8)
    assert emb.grid.grid_shape == (1, 2)
    asked = []

    def across(plane, prompt, multimask=None):
        # Embeddings.segment (tested elsewhere) answers with the drawn disc under the point
        (x, y), = prompt.points
        asked.append((x, y))
        return PlaneMask.from_full(truth == truth[int(y), int(x)], iou=0.99)

    emb.segment = across
    seen = []
    labels = segment_apg(emb, 0, KnownMaps(instance_targets(truth), emb.grid), APGSettings(), progress=seen.append)
    assert labels.shape == (48, 90) and labels.dtype == np.uint32
    ids = np.unique(labels[labels > 0])
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    assert [r.tile for r in seen if r.stage == "tiles"] == [(0, 0), (0, 1)]
    prompts = [(r.done, r.total, r.tile) for r in seen if r.stage == "prompts"]
    # two batches (one per tile, 2 + 1 points), then one report per mask asked across tiles
    assert [p[1] for p in prompts[:2]] == [3, 3] and {p[2] for p in prompts[:2]} == {(0, 0), (0, 1)}
    assert prompts[2:] == [(n, len(asked), None) for n in range(1, len(asked) + 1)]
    # a random SAM's masks spread to the edge of what their tile saw: those are asked
    # again, and the (stand-in) answers replace them before the filters
    points = prompt_points(*instance_targets(truth))
    assert 1 <= len(asked) <= 3 and set(asked) <= {tuple(p) for p in points}
    groups = {}
    for i, (x, y) in enumerate(points):
        groups.setdefault(emb.grid.tile_at(x, y).index, []).append(i)
    _, found = drain(iter_tile_prompts(emb, 0, groups, 32, 3, points=points))
    kept = [c for i, c in found if tuple(points[i]) not in asked]
    discs_asked = [PlaneMask.from_full(truth == truth[int(y), int(x)], iou=0.99) for x, y in asked]
    answers = [Candidate(m.region, m.mask, m.iou) for m in discs_asked]
    np.testing.assert_array_equal(labels, select_masks((48, 90), kept + answers, APGSettings()))
    for i, c in found:
        y0, y1, x0, x1 = c.region
        oy0, oy1, ox0, ox1 = emb.grid.tile_at(*points[i]).outer
        assert (tuple(points[i]) in asked) == ((x0 == ox0 > 0) or (x1 == ox1 < 90))


def test_a_decoder_in_training_mode_is_refused(model):
    emb = Embeddings(np.zeros((32, 32), np.uint8), model, cache=False)
    model.instance_decoder.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            segment_apg(emb, 0, model.instance_decoder)
    finally:
        model.instance_decoder.eval()


def test_names_resolve_from_the_package():
    import napari_sam.auto as auto

    assert auto.segment_apg is segment_apg and auto.APGSettings is APGSettings and auto.iter_apg is iter_apg
