"""The head that sharpens prompted masks with the image: an untrained one changes nothing,
it works inside a window around each mask, its state loads back strictly, and the
predictor and the tiled path use it only when they have the pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam.model.mask_refiner import WINDOW_MARGIN, MaskRefiner, mask_refiner_from_state_dict


def _shifted(width: int = 4, depth: int = 3, bias: float = 5.0) -> MaskRefiner:
    """A refiner whose correction is a constant: every pixel it computes gains ``bias``."""
    refiner = MaskRefiner(width, depth).eval()
    with torch.no_grad():
        refiner.body[-1].bias.fill_(bias)
    return refiner


def test_an_untrained_refiner_changes_nothing():
    torch.manual_seed(0)
    logits, image = torch.randn(3, 1, 64, 64) * 3, torch.randn(1, 3, 64, 64)
    refined = MaskRefiner(4, 3).refine(logits, image)
    torch.testing.assert_close(refined, logits, rtol=0, atol=0)


def test_the_correction_stays_inside_each_masks_window_and_an_empty_mask_is_left_alone():
    logits = torch.full((2, 1, 128, 128), -10.0)
    logits[0, 0, 50:60, 40:52] = 30.0  # an object; the second mask is empty
    with torch.no_grad():
        refined = _shifted().refine(logits, torch.zeros(1, 3, 128, 128))
    changed = (refined[0, 0] != logits[0, 0]).nonzero()
    assert changed[:, 0].min() == 50 - WINDOW_MARGIN and changed[:, 0].max() == 59 + WINDOW_MARGIN
    assert changed[:, 1].min() == 40 - WINDOW_MARGIN and changed[:, 1].max() == 51 + WINDOW_MARGIN
    # inside the window the head read the clipped logits and added its bias
    assert float(refined[0, 0, 55, 45]) == pytest.approx(20.0 + 5.0)
    assert float(refined[0, 0, 30, 30]) == pytest.approx(-10.0 + 5.0)
    torch.testing.assert_close(refined[1], logits[1], rtol=0, atol=0)


def test_low_res_logits_are_enlarged_to_the_image_before_refining():
    low = torch.full((1, 1, 16, 16), -10.0)
    low[0, 0, 4:8, 4:8] = 10.0
    refined = MaskRefiner(4, 3).refine_low_res(low, torch.zeros(1, 3, 64, 64))
    assert refined.shape == (1, 1, 64, 64)
    assert bool(refined[0, 0, 24, 24] > 0) and bool(refined[0, 0, 40, 40] < 0)


@pytest.mark.parametrize(("width", "depth"), [(4, 3), (8, 5)])
def test_the_state_loads_back_with_its_shape_read_from_the_keys(width, depth):
    torch.manual_seed(1)
    refiner = MaskRefiner(width, depth)
    for p in refiner.parameters():
        torch.nn.init.normal_(p)
    again = mask_refiner_from_state_dict({k: v.half() for k, v in refiner.state_dict().items()})
    assert again.depth == depth and again.body[0].out_channels == width
    for (k, a), b in zip(refiner.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(b, a.half().float(), msg=k)


def test_a_state_that_is_not_a_mask_refiners_is_refused_with_the_keys_named():
    state = MaskRefiner(4, 3).state_dict()
    with pytest.raises(ValueError, match="not a mask refiner's state"):
        mask_refiner_from_state_dict({k: v for k, v in state.items() if k != "body.0.weight"})
    with pytest.raises(ValueError, match="extra.weight"):
        mask_refiner_from_state_dict(dict(state, **{"extra.weight": torch.zeros(1)}))
    bad = dict(state)
    bad["image.0.weight"] = torch.zeros(3, 1, 3, 3)
    with pytest.raises(ValueError, match="does not fit"):
        mask_refiner_from_state_dict(bad)


def test_the_predictor_refines_with_the_pixels_and_only_then(tiny_sam):
    from napari_sam.core.predictor import Predictor

    rng = np.random.default_rng(0)
    image = (rng.random((90, 120)) * 255).astype(np.uint8)
    plain = Predictor(tiny_sam, traced=False)
    plain.set_image(image)
    expected = plain.predict(points=[[40, 30]], labels=[1], return_logits=True).masks
    tiny_sam.mask_refiner = _shifted()
    try:
        refining = Predictor(tiny_sam, traced=False)
        refining.set_image(image)
        got = refining.predict(points=[[40, 30]], labels=[1], return_logits=True).masks
        # an embedding set without its pixels gets SAM's own masks
        refining.set_embedding(refining.embedding)
        without = refining.predict(points=[[40, 30]], labels=[1], return_logits=True).masks
    finally:
        tiny_sam.mask_refiner = None
    np.testing.assert_array_equal(without, expected)
    assert got.shape == expected.shape
    # masks with any foreground were lifted by the head's bias inside their windows
    lifted = [k for k in range(len(expected)) if (expected[k] > 0).any()]
    assert lifted and all((got[k] > expected[k] + 1).any() for k in lifted)


def test_tiled_answers_are_refined_first_only_and_never_when_asked_not_to_or_on_haematoxylin(tiny_sam):
    from napari_sam.core.embeddings import Embeddings
    from napari_sam.core.pixel_heads import refines_masks
    from napari_sam.core.prompts import Prompt
    from napari_sam.core.stain import HAEMATOXYLIN

    rng = np.random.default_rng(2)
    image = (rng.random((96, 96)) * 255).astype(np.uint8)
    tiny_sam.mask_refiner = _shifted(bias=8.0)
    try:
        emb = Embeddings(image, tiny_sam, cache=False, axes="YX", magnification=1.0)
        prompt = Prompt.make([[40, 50]], [1])
        refined = emb.segment(0, prompt, multimask=False).to_full((96, 96))
        plain = emb.segment(0, prompt, multimask=False, refine=False).to_full((96, 96))
        first = emb.segment(0, prompt, multimask=False)
        sams = emb.segment(0, prompt, multimask=False, refine=False)
        assert refines_masks(tiny_sam) and not refines_masks(tiny_sam, HAEMATOXYLIN)
    finally:
        tiny_sam.mask_refiner = None
    assert refined.sum() > plain.sum()  # the head's bias grew the mask inside its window
    # the logits a correction sends back are the refined ones, averaged onto SAM's grid
    assert first.logits.shape == sams.logits.shape
    assert (first.logits > sams.logits + 1).any() and (first.logits >= sams.logits - 1e-4).all()


def test_an_answer_to_a_correction_is_sams_own(tiny_sam):
    from napari_sam.core.predictor import Predictor

    rng = np.random.default_rng(3)
    image = (rng.random((80, 80)) * 255).astype(np.uint8)
    plain = Predictor(tiny_sam, traced=False)
    plain.set_image(image)
    prompt = dict(points=[[30, 30], [60, 20]], labels=[1, 0], multimask=False, return_logits=True)
    low = plain.predict(points=[[30, 30]], labels=[1]).low_res_logits[:1]
    expected = plain.predict(mask_input=low, **prompt)
    tiny_sam.mask_refiner = _shifted()
    try:
        refining = Predictor(tiny_sam, traced=False)
        refining.set_image(image)
        got = refining.predict(mask_input=low, **prompt)
        first = refining.predict(**prompt)
    finally:
        tiny_sam.mask_refiner = None
    np.testing.assert_array_equal(got.masks, expected.masks)
    np.testing.assert_array_equal(got.prompt_logits, got.low_res_logits)
    assert not np.array_equal(first.prompt_logits, first.low_res_logits)


def test_planes_enlarged_as_much_as_the_checkpoint_says_or_more_keep_sams_masks(tiny_sam):
    from napari_sam.core.embeddings import Embeddings
    from napari_sam.core.pixel_heads import refines_masks
    from napari_sam.core.prompts import Prompt

    image = (np.random.default_rng(2).random((96, 96)) * 255).astype(np.uint8)
    prompt = Prompt.make([[40, 50]], [1])
    tiny_sam.mask_refiner = _shifted(bias=8.0)
    try:
        tiny_sam.metadata = {"mask_refiner": {"refine_below_magnification": 2.0}}
        assert refines_masks(tiny_sam, None, 1.9) and not refines_masks(tiny_sam, None, 2.0)
        assert refines_masks(tiny_sam)  # a plane's enlargement unknown: as before
        # the 96-pixel plane fills the 1024-pixel input: enlarged 10.7 times, though at magnification 1
        emb = Embeddings(image, tiny_sam, cache=False, axes="YX", magnification=1.0)
        kept = emb.segment(0, prompt, multimask=False).to_full((96, 96))
        plain = emb.segment(0, prompt, multimask=False, refine=False).to_full((96, 96))
        tiny_sam.metadata = {"mask_refiner": {"refine_below_magnification": 12.0}}
        emb = Embeddings(image, tiny_sam, cache=False, axes="YX", magnification=1.0)
        refined = emb.segment(0, prompt, multimask=False).to_full((96, 96))
    finally:
        tiny_sam.mask_refiner = None
        tiny_sam.metadata = {}
    np.testing.assert_array_equal(kept, plain)
    assert refined.sum() > plain.sum()
