"""SAM 2.1 video tracking against the official ``SAM2VideoPredictor`` (tests/reference/sam2).

Every reference set with a ``video.npz`` is replayed step by step through our
:class:`Sam2Video`: the prompts on a frame (points, a box, a mask, an empty mask), forward
and reverse propagation from the prompted frame, a correction click on a tracked frame and
propagation again. Every step's video-resolution logits (one plane per object) are compared
with the official ones, and after each propagation the object scores in memory. Frames are
preprocessed as tests/reference/sam2/README.md says (the image predictor's preprocessing,
which the README's checksum pins). Tolerances as there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _sets import load_set, reference_sets

from napari_sam.model.sam2 import config_from_official, sam2_from_state_dict
from napari_sam.model.sam2.image_predictor import preprocess
from napari_sam.model.sam2.video import Sam2Video

SETS = [p for p in reference_sets() if (p / "video.npz").is_file()]
ATOL, RTOL = 5e-3, 1e-3  # logits
SCORE_ATOL = 1e-3  # object scores
MASK_AGREEMENT = 0.999

pytestmark = pytest.mark.skipif(not SETS, reason="no SAM 2.1 reference set with a video")


@pytest.fixture(scope="module", params=SETS, ids=[p.name for p in SETS])
def replay(request):
    """Replay the recorded session once per set; every test reads the results."""
    config, state, _, data = load_set(request.param)
    cfg = config_from_official(config, name=request.param.name)
    model = sam2_from_state_dict({"model": state}, cfg)
    frames = data["frames"]
    num_frames, height, width, _ = frames.shape
    inputs = torch.cat([preprocess(f, model.image_size, cfg.pixel_mean, cfg.pixel_std) for f in frames])
    cache: dict[int, dict] = {}

    def features(i: int) -> dict:
        if i not in cache:
            with torch.inference_mode():
                cache[i] = model.forward_image(inputs[i:i + 1])
        return cache[i]

    video = Sam2Video(model, features, num_frames, (height, width))
    results: dict[str, dict] = {}
    for step in ("add1", "add2", "add3", "add4"):
        frame, obj_id = int(data[f"{step}/frame"]), int(data[f"{step}/obj_ids"][-1])
        if f"{step}/in_mask" in data:
            logits = video.add_mask(frame, obj_id, data[f"{step}/in_mask"])
        elif f"{step}/in_box" in data:
            logits = video.add_points(frame, obj_id, box=data[f"{step}/in_box"])
        else:
            logits = video.add_points(frame, obj_id, data[f"{step}/in_points"], data[f"{step}/in_labels"])
        results[step] = {"logits": logits, "obj_ids": video.obj_ids}
    start = int(data["add1/frame"])
    for phase, kwargs in (("forward", {"start": start}), ("reverse", {"start": start, "reverse": True}),
                          ("correct", None), ("forward2", {})):
        if kwargs is None:
            frame = int(data["correct/frame"])
            logits = video.add_points(frame, int(data["add1/obj_ids"][0]), data["correct/in_points"],
                                      data["correct/in_labels"])
            results[phase] = {"logits": logits, "obj_ids": video.obj_ids}
            continue
        steps = list(video.propagate(**kwargs))
        results[phase] = {
            "frames": [f for f, _, _ in steps],
            "obj_ids": [ids for _, ids, _ in steps],
            "logits": torch.stack([logits for _, _, logits in steps]),
            "scores": torch.stack([video.object_scores(t) for t in range(num_frames)], dim=1),
        }
    return data, results, inputs


def _compare(ours: torch.Tensor, theirs: np.ndarray, what: str) -> None:
    got = ours.float().cpu().numpy()
    assert got.shape == theirs.shape, f"{what}: shape {got.shape} vs {theirs.shape}"
    np.testing.assert_allclose(got, theirs, atol=ATOL, rtol=RTOL, err_msg=what)
    agree = np.mean((got > 0) == (theirs > 0))
    assert agree >= MASK_AGREEMENT, f"{what}: masks agree on {agree:.5f} of the pixels"


def test_the_set_preprocesses_frames_as_the_official(replay):
    data, _, inputs = replay
    checksum = np.array([inputs.double().sum().item(), inputs.double().abs().sum().item()])
    np.testing.assert_allclose(checksum, data["model_input_checksum"], rtol=1e-9)


@pytest.mark.parametrize("step", ["add1", "add2", "add3", "add4", "correct"])
def test_prompts_match(replay, step):
    data, results, _ = replay
    assert results[step]["obj_ids"] == [int(i) for i in data[f"{step}/obj_ids"]]
    _compare(results[step]["logits"], data[f"{step}/logits"], step)


@pytest.mark.parametrize("phase", ["forward", "reverse", "forward2"])
def test_propagation_matches(replay, phase):
    data, results, _ = replay
    got = results[phase]
    assert got["frames"] == [int(f) for f in data[f"{phase}/frames"]]
    assert got["obj_ids"] == [[int(i) for i in row] for row in data[f"{phase}/obj_ids"]]
    _compare(got["logits"], data[f"{phase}/logits"], phase)
    theirs = data[f"{phase}/object_score_logits"]
    ours = got["scores"].numpy()
    assert np.array_equal(np.isnan(ours), np.isnan(theirs)), f"{phase}: frames with results differ"
    np.testing.assert_allclose(ours, theirs, atol=SCORE_ATOL, rtol=0, err_msg=f"{phase} object scores")

