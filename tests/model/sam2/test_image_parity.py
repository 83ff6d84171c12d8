"""SAM 2.1 image prediction against the official implementation (tests/reference/sam2).

Every reference set is loaded into our model strictly; for both images the features and,
for every prompt case with one and with three masks, the IoU predictions, object scores,
low-res logits, full-size logits and masks are compared with what the official
``SAM2ImagePredictor`` gave. Tolerances as tests/reference/sam2/README.md says.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _sets import load_set, reference_sets

from napari_sam.model.sam2 import Sam2ImagePredictor, config_from_official, sam2_from_state_dict
from napari_sam.model.sam2.config import FpnNeckConfig, HieraConfig, ImageEncoderConfig, PositionEmbeddingSineConfig
from napari_sam.model.sam2.hiera import Hiera, pool_2x2
from napari_sam.model.sam2.image_encoder import ImageEncoder

SETS = reference_sets()
ATOL, RTOL = 5e-3, 1e-3  # features and logits
SCORE_ATOL = 1e-3  # IoU predictions, object scores
MASK_AGREEMENT = 0.999
CASES = ("one_point", "fg_bg_points", "box", "box_and_points", "points_with_mask", "boxes_batch")



@pytest.fixture(scope="module", params=SETS, ids=[p.name for p in SETS])
def reference(request):
    config, state, data, _ = load_set(request.param)
    model = sam2_from_state_dict({"model": state}, config_from_official(config, name=request.param.name))
    predictors = {}
    for img in _images(data):
        predictors[img] = Sam2ImagePredictor(model)
        predictors[img].set_image(data[f"{img}/image"])
    return model, data, predictors


def _close(ours: torch.Tensor, theirs: np.ndarray, what: str, atol: float = ATOL, rtol: float = RTOL) -> None:
    ours_np = ours.detach().float().cpu().numpy()
    assert ours_np.shape == theirs.shape, f"{what}: shape {ours_np.shape} vs {theirs.shape}"
    np.testing.assert_allclose(ours_np, theirs, atol=atol, rtol=rtol, err_msg=what)


def _images(data: dict) -> list[str]:
    return sorted({key.split("/")[0] for key in data if key.endswith("/image")})


def test_the_sets_cover_every_case(reference):
    _, data, _ = reference
    assert _images(data) == ["square", "wide"]
    for img in _images(data):
        for case in CASES:
            for multi in (0, 1):
                assert f"{img}/{case}/multi{multi}/iou_predictions" in data


def test_features_match(reference):
    _, data, predictors = reference
    for img, predictor in predictors.items():
        _close(predictor.get_image_embedding(), data[f"{img}/image_embed"], f"{img} image_embed")
        for level, feat in enumerate(predictor._require()["high_res_feats"]):
            _close(feat[..., ::4, ::4], data[f"{img}/high_res_feats_{level}_s4"], f"{img} high_res_feats {level}")


def _prompts(data: dict, prefix: str, case_prefix: str) -> dict:
    kwargs = {}
    if f"{prefix}/in_point_coords" in data:
        kwargs["point_coords"] = data[f"{prefix}/in_point_coords"]
        kwargs["point_labels"] = data[f"{prefix}/in_point_labels"]
    if f"{prefix}/in_box" in data:
        kwargs["box"] = data[f"{prefix}/in_box"]
    if f"{case_prefix}/in_mask_input" in data:
        kwargs["mask_input"] = data[f"{case_prefix}/in_mask_input"]
    return kwargs


@pytest.mark.parametrize("case", CASES)
def test_predictions_match(reference, case, monkeypatch):
    model, data, predictors = reference
    decoder = model.sam_mask_decoder
    scores: list[torch.Tensor] = []
    predict = decoder.predict

    def recording(*args, **kwargs):
        out = predict(*args, **kwargs)
        scores.append(out[3])
        return out

    monkeypatch.setattr(decoder, "predict", recording)
    for img, predictor in predictors.items():
        height, width = (int(n) for n in data[f"{img}/original_size"])
        for multi in (0, 1):
            prefix = f"{img}/{case}/multi{multi}"
            kwargs = _prompts(data, prefix, f"{img}/{case}")
            assert kwargs, f"{prefix} has no prompt"
            logits, ious, low = predictor.predict(**kwargs, multimask_output=bool(multi), return_logits=True)
            masks, _, _ = predictor.predict(**kwargs, multimask_output=bool(multi))
            batch = () if case != "boxes_batch" else (3,)
            channels = 3 if multi else 1
            assert tuple(logits.shape) == (*batch, channels, height, width)
            assert masks.dtype == torch.bool and torch.equal(masks, logits > 0)
            _close(ious, data[f"{prefix}/iou_predictions"], f"{prefix} iou", atol=SCORE_ATOL, rtol=0)
            _close(scores[-1].reshape(-1), data[f"{prefix}/object_score_logits"].reshape(-1), f"{prefix} object score",
                   atol=SCORE_ATOL, rtol=0)
            _close(low[..., ::4, ::4], data[f"{prefix}/low_res_logits_s4"], f"{prefix} low-res logits")
            if f"{prefix}/low_res_logits" in data:
                _close(low, data[f"{prefix}/low_res_logits"], f"{prefix} full low-res logits")
            if f"{prefix}/logits_s4" in data:
                _close(logits[..., ::4, ::4], data[f"{prefix}/logits_s4"], f"{prefix} full-size logits")
            if f"{prefix}/masks" in data:
                theirs = data[f"{prefix}/masks"]
                assert tuple(masks.shape) == theirs.shape
                agreement = float((masks.numpy() == theirs).mean())
                assert agreement >= MASK_AGREEMENT, f"{prefix}: masks agree on {agreement:.5f} of the pixels"


def test_low_res_logits_feed_back_as_mask_input(reference):
    """The low-res output of one call is a valid mask prompt for the next, as in the official loop."""
    _, data, predictors = reference
    predictor = predictors["square"]
    prefix = "square/one_point/multi1"
    _, ious, low = predictor.predict(point_coords=data[f"{prefix}/in_point_coords"],
                                     point_labels=data[f"{prefix}/in_point_labels"])
    best = low[int(ious.argmax())][None]
    _close(best, data["square/points_with_mask/in_mask_input"], "best low-res mask of one_point/multi1")


# Our faster routes against the plain operations they replace (no reference set needed).

SMALL = HieraConfig(embed_dim=8, num_heads=1, stages=(1, 2, 3, 2), global_att_blocks=(4,),
                    window_pos_embed_bkg_spatial_size=(7, 7))


def _randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


@pytest.mark.parametrize("shape", [(2, 9, 7, 5), (1, 8, 8, 3)])
def test_pooling_is_max_pool(shape):
    x = torch.randn(shape)
    strided = torch.randn(*shape[:-1], 3 * shape[-1])[..., : shape[-1]]  # a query slice of qkv
    for t in (x, strided):
        want = torch.nn.functional.max_pool2d(t.permute(0, 3, 1, 2), 2, 2).permute(0, 2, 3, 1)
        assert torch.equal(pool_2x2(t, (2, 2)), want)


def test_hiera_is_the_same_with_and_without_autograd():
    trunk = _randomised(Hiera(SMALL))
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        fast = trunk(x)
    x.requires_grad_(True)
    plain = trunk(x)
    assert [tuple(t.shape) for t in plain] == [(1, 8, 64, 64), (1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8)]
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    plain[-1].sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert trunk.pos_embed.grad is not None


def test_the_position_embedding_follows_its_parameters():
    trunk = _randomised(Hiera(SMALL))
    with torch.no_grad():
        first = trunk.pos_embed_for(64, 64).clone()
        trunk.pos_embed.add_(1.0)
        second = trunk.pos_embed_for(64, 64)
    torch.testing.assert_close(second, first + 1.0)


def test_projected_levels_equal_convolutions_of_the_neck_output():
    config = ImageEncoderConfig(SMALL, FpnNeckConfig(PositionEmbeddingSineConfig(32), 32, SMALL.channel_list,
                                                     fpn_interp_model="nearest", fpn_top_down_levels=(2, 3)), scalp=1)
    encoder = _randomised(ImageEncoder(config))
    s0, s1 = (_randomised(torch.nn.Conv2d(32, c, 1), seed=c) for c in (4, 8))
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        plain = encoder(x)
        fused = encoder(x, [s0, s1])
        want = [s0(plain["backbone_fpn"][0]), s1(plain["backbone_fpn"][1]), plain["backbone_fpn"][2]]
    assert len(fused["backbone_fpn"]) == 3 and fused["vision_features"] is fused["backbone_fpn"][2]
    for a, b in zip(fused["backbone_fpn"], want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert a.is_contiguous()
    assert [tuple(p.shape) for p in fused["vision_pos_enc"]] == [(1, 32, 64, 64), (1, 32, 32, 32), (1, 32, 16, 16)]


def test_an_empty_mask_as_output_says_no_object(reference):
    model, data, predictors = reference
    feats = predictors["square"]._require()
    size = model.image_size
    mask = torch.zeros(2, 1, size, size, dtype=torch.bool)
    mask[0, :, 100:300, 200:500] = True
    embed = feats["image_embed"].expand(2, -1, -1, -1)
    high_res = [f.expand(2, -1, -1, -1) for f in feats["high_res_feats"]]
    with torch.no_grad():
        low, high, ious, _, _, obj_ptr, scores = model.use_mask_as_output(embed, high_res, mask)
    assert tuple(low.shape) == (2, 1, size // 4, size // 4) and tuple(high.shape) == (2, 1, size, size)
    assert scores.flatten().tolist() == [10.0, -10.0] and ious.flatten().tolist() == [1.0, 1.0]
    assert float(high[0, 0, 150, 300]) == 10.0 and float(high[1].max()) == -10.0
    # fixed_no_obj_ptr: an absent object's pointer is exactly the learned "no object" one
    torch.testing.assert_close(obj_ptr[1], model.no_obj_ptr[0])


def test_a_batch_of_images_gives_what_each_image_gives(reference):
    model, data, predictors = reference
    batch = Sam2ImagePredictor(model)
    batch.set_image_batch([data["square/image"], data["wide/image"]])
    embed = batch.get_image_embedding()
    assert tuple(embed.shape[:2]) == (2, model.hidden_dim)
    for index, img in enumerate(["square", "wide"]):
        single = predictors[img].get_image_embedding()
        torch.testing.assert_close(embed[index : index + 1], single, atol=1e-4, rtol=1e-4)
    prefix = "wide/box_and_points/multi1"
    kwargs = _prompts(data, prefix, "wide/box_and_points")
    ours = batch.predict(**kwargs, image_index=1, return_logits=True)
    single = predictors["wide"].predict(**kwargs, return_logits=True)
    assert ours[0].shape == single[0].shape == (3, *data["wide/original_size"])
    for a, b in zip(ours, single):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_the_predictor_refuses_bad_input_in_one_line(reference):
    model, data, predictors = reference
    fresh = Sam2ImagePredictor(model)
    with pytest.raises(ValueError, match="no image is set"):
        fresh.predict(point_coords=[[10.0, 10.0]], point_labels=[1])
    with pytest.raises(ValueError, match=r"\(H, W, 3\) RGB, not \(5, 5\)"):
        fresh.set_image(np.zeros((5, 5), np.uint8))
    with pytest.raises(ValueError, match="uint8 or floating point"):
        fresh.set_image(np.zeros((5, 5, 3), np.int32))
    predictor = predictors["square"]
    with pytest.raises(ValueError, match="point_labels must be given"):
        predictor.predict(point_coords=[[10.0, 10.0]])
    with pytest.raises(ValueError, match="image_index 1 is not one of the 1 images"):
        predictor.predict(point_coords=[[10.0, 10.0]], point_labels=[1], image_index=1)
    with pytest.raises(ValueError, match=r"box must be \(4,\) or \(B, 4\)"):
        predictor.predict(box=[1.0, 2.0, 3.0])
