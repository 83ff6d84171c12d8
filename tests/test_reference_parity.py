"""Parity with the official Segment Anything implementation.

Every ``*.pth`` in ``NAPARI_SAM_REFERENCE_DIR`` (default ``../shared/reference``) that has a
``*_outputs.npz`` beside it is a reference set: a randomised model in the official key
format with inputs and the official outputs. Dropping another set there adds tests.
The configuration of each model is inferred from its state dict.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_sam.core.predictor import Predictor
from napari_sam.model import infer_config, matmul, sam_from_state_dict

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("NAPARI_SAM_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
SETS = sorted(p for p in REFERENCE_DIR.glob("*.pth") if p.with_name(p.stem + "_outputs.npz").exists())

# Tolerances from the reference README: two correct float32 implementations differ by
# summation order (the official code itself reproduces TinyViT embeddings to ~2.4e-3).
EMB_TOL = dict(atol=5e-3, rtol=1e-3)
LOGIT_TOL = dict(atol=5e-3, rtol=1e-3)
IOU_ATOL = 1e-3
MASK_AGREEMENT = 0.999


def test_reference_sets_present():
    assert SETS, f"no reference sets (*.pth with *_outputs.npz) found in {REFERENCE_DIR}"


@pytest.fixture(scope="module", params=SETS, ids=[p.stem for p in SETS])
def reference(request):
    path = request.param
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = sam_from_state_dict(state_dict)
    outputs = np.load(path.with_name(path.stem + "_outputs.npz"))
    return path.stem, infer_config(state_dict), model, outputs


def _images(outputs):
    return sorted({k.split("/")[0] for k in outputs.files})


def _cases(outputs, image):
    return sorted({k.rsplit("/", 1)[0] for k in outputs.files if k.count("/") == 3 and k.startswith(image + "/")})


def test_config_inferred_from_state_dict(reference):
    stem, config, model, _ = reference
    expected = "vit_t" if "vit_t" in stem else None
    if expected:
        assert config.name == expected
    assert model.config == config


@pytest.fixture(params=["onednn-cached", "aten-cached", "onednn-plain"])
def route(request, monkeypatch):
    """Both ways of computing the matrix products (see ``napari_sam.model.matmul``), and
    both decoder formulations: the cached image context of interactive prediction, and
    the plain one (no context) that training differentiates."""
    products, decoder = request.param.split("-")
    if products == "onednn" and not matmul.available():
        pytest.skip("this torch build has no oneDNN linear kernel")
    monkeypatch.setattr(matmul, "enabled", products == "onednn")
    return decoder


def test_embedding_and_every_prompt_case(reference, route, monkeypatch):
    stem, _, model, outputs = reference
    predictor = Predictor(model, traced=route == "cached")
    plain_calls = []
    if route == "plain":
        decode = model.decode

        def plain(*args, **kwargs):
            plain_calls.append(1)
            return decode(*args, **{**kwargs, "context": None})

        monkeypatch.setattr(model, "decode", plain)
    images = _images(outputs)
    assert images, f"{stem}: no images in the outputs file"
    checked = 0
    for image in images:
        original_size = tuple(int(s) for s in outputs[f"{image}/original_size"])
        emb = predictor.set_model_input(outputs[f"{image}/image"], original_size)
        np.testing.assert_allclose(
            emb.features.numpy(), outputs[f"{image}/embedding"], **EMB_TOL, err_msg=f"{stem} {image} embedding"
        )
        # Prompts are answered on the official embedding so that decoder differences are
        # measured on their own, not compounded with the encoder's.
        predictor.set_embedding(
            type(emb)(torch.from_numpy(outputs[f"{image}/embedding"]), emb.input_size, original_size)
        )
        for key in _cases(outputs, image):
            get = lambda name, key=key: outputs[f"{key}/{name}"] if f"{key}/{name}" in outputs.files else None  # noqa: E731
            multimask = key.endswith("multi1")
            mask_input = get("in_mask_input")
            result = predictor.predict(
                points=get("in_point_coords"),
                labels=get("in_point_labels"),
                box=get("in_box"),
                mask_input=mask_input,
                multimask=multimask,
            )
            np.testing.assert_allclose(result.low_res_logits, get("low_res_logits"), **LOGIT_TOL, err_msg=key)
            np.testing.assert_allclose(result.iou, get("iou_predictions"), atol=IOU_ATOL, err_msg=key)
            expected_masks = get("masks")
            assert result.masks.shape == expected_masks.shape, key
            agreement = (result.masks == expected_masks).mean()
            assert agreement >= MASK_AGREEMENT, f"{key}: only {agreement:.5f} of mask pixels agree"
            full_logits = get("masks_logits")
            if full_logits is not None:
                logits = predictor.predict(
                    points=get("in_point_coords"), box=get("in_box"), multimask=multimask, return_logits=True
                ).masks
                np.testing.assert_allclose(logits, full_logits, **LOGIT_TOL, err_msg=key + " full-size logits")
            checked += 1
    assert checked >= 10 * len(images), f"{stem}: only {checked} prompt cases checked"
    assert len(plain_calls) >= (checked if route == "plain" else 0)


def test_encoder_input_path_matches_official_embedding(reference):
    """The embedding also matches when computed from the full-size image through our own
    preprocessing, for the square image where no resize happens."""
    stem, _, model, outputs = reference
    image = outputs["square/image"]
    predictor = Predictor(model)
    emb = predictor.set_image(image)  # uint8 RGB passes through unnormalised
    assert emb.original_size == image.shape[:2]
    np.testing.assert_allclose(emb.features.numpy(), outputs["square/embedding"], **EMB_TOL)


def test_training_route_matches_official(reference):
    """What the trainer differentiates (autograd recording: ``F.linear``, the fused
    attention kernel, the plain decoder) gives the official numbers too."""
    stem, _, model, outputs = reference
    image = outputs["square/image"]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    before = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)
    try:
        with torch.enable_grad():
            emb = model.embed(x)
            assert emb.requires_grad
            np.testing.assert_allclose(emb.detach().numpy(), outputs["square/embedding"], **EMB_TOL, err_msg=stem)
            official = torch.from_numpy(outputs["square/embedding"])
            for key in ("square/one_point/multi1", "square/points_with_mask/multi0"):
                get = lambda name, key=key: outputs[f"{key}/{name}"] if f"{key}/{name}" in outputs.files else None  # noqa: E731
                mask = get("in_mask_input")
                low, iou = model.decode(
                    official,
                    torch.from_numpy(get("in_point_coords")).float()[None],
                    torch.from_numpy(get("in_point_labels")).long()[None],
                    mask_input=None if mask is None else torch.from_numpy(mask).float()[None],
                    multimask_output=key.endswith("multi1"),
                )
                assert low.requires_grad
                np.testing.assert_allclose(low[0].detach().numpy(), get("low_res_logits"), **LOGIT_TOL, err_msg=key)
                np.testing.assert_allclose(iou[0].detach().numpy(), get("iou_predictions"), atol=IOU_ATOL, err_msg=key)
    finally:
        for p, flag in zip(model.parameters(), before):
            p.requires_grad_(flag)
