"""The head that chooses among a lone click's three masks: its windows frame the masks and
the click, it travels in the mask refiner's state and loads back strictly, and the
predictor and the tiled path let it rank a lone click's masks and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam.model.mask_chooser import WINDOW, MaskChooser, chooser_windows, mask_chooser_from_state_dict
from napari_sam.model.mask_refiner import MaskRefiner, mask_refiner_from_state_dict


def _preferring(k: int) -> MaskChooser:
    """A chooser that says mask ``k`` fits (IoU about 1) and the others do not, whatever it sees."""
    chooser = MaskChooser(8).eval()
    with torch.no_grad():
        last = chooser.head[-1]
        last.weight.zero_()
        last.bias.fill_(-6.0)
        last.bias[k] = 6.0
    return chooser


def _disc_logits(n: int, side: int, centre: tuple[float, float], radius: float) -> torch.Tensor:
    yy, xx = np.mgrid[:side, :side]
    disc = np.where((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2, 10.0, -10.0).astype(np.float32)
    return torch.from_numpy(np.broadcast_to(disc, (n, 3, side, side)).copy())


def test_the_window_frames_the_masks_and_the_click_at_a_fixed_side():
    # a disc of radius 4 low-res pixels (16 model-input pixels) at (20, 30) on a 64-pixel grid
    low = _disc_logits(1, 64, (20, 30), 4)
    image = torch.zeros(256, 256)
    image[60:100, 100:140] = 5.0
    windows, side = chooser_windows(low, image, torch.tensor([[122.0, 82.0]]))
    assert windows.shape == (1, 4, WINDOW, WINDOW)
    # the disc spans about 32 input pixels: the window is about 32 x 1.3 + 8 across
    assert 44 <= float(side[0]) <= 56
    mask = windows[0, 1] > 0
    assert mask[WINDOW // 2, WINDOW // 2] and not mask[0, 0] and not mask[-1, -1]
    assert 0.2 < mask.float().mean() < 0.5  # the disc fills the window's middle, not all of it
    # a click far from the masks widens the window to take it in
    _, wide = chooser_windows(low, image, torch.tensor([[240.0, 240.0]]))
    assert float(wide[0]) > 150
    # no mask at all: a small window around the click
    _, small = chooser_windows(torch.full((1, 3, 64, 64), -5.0), image, torch.tensor([[10.0, 10.0]]))
    assert float(small[0]) == pytest.approx(16.0)


def test_estimates_are_ious_between_0_and_1_for_each_of_the_three_masks():
    torch.manual_seed(0)
    chooser = MaskChooser(8).eval()
    est = chooser.estimate(_disc_logits(2, 64, (30, 30), 5), torch.randn(1, 3, 256, 256),
                           torch.tensor([[120.0, 120.0], [118.0, 125.0]]), torch.rand(2, 3))
    assert est.shape == (2, 3) and bool(((est > 0) & (est < 1)).all())
    assert torch.equal(_preferring(2).estimate(_disc_logits(1, 64, (30, 30), 5), torch.randn(1, 3, 256, 256),
                                               torch.tensor([[120.0, 120.0]]), torch.rand(1, 3)).argmax(1),
                       torch.tensor([2]))


def test_the_chooser_travels_in_the_refiners_state_and_loads_back_strictly():
    refiner = MaskRefiner(4, 3)
    refiner.chooser = _preferring(1)
    state = refiner.state_dict()
    assert any(k.startswith("chooser.body.") for k in state) and "body.0.weight" in state
    loaded = mask_refiner_from_state_dict({k: v.half() for k, v in state.items()})
    assert loaded.chooser is not None
    for name, value in refiner.chooser.state_dict().items():
        torch.testing.assert_close(loaded.chooser.state_dict()[name], value.half().float())
    # a refiner's state without one loads as before
    assert mask_refiner_from_state_dict(MaskRefiner(4, 3).state_dict()).chooser is None
    # a chooser's state that does not fit is refused, naming the problem
    broken = dict(state)
    broken.pop("chooser.head.2.bias")
    with pytest.raises(ValueError, match="mask chooser state does not fit"):
        mask_refiner_from_state_dict(broken)
    with pytest.raises(ValueError, match="not a mask chooser's state"):
        mask_chooser_from_state_dict({"body.0.0.weight": torch.zeros(8, 3, 3, 3)})


def test_the_predictor_lets_the_chooser_rank_a_lone_click_and_nothing_else(tiny_sam):
    from napari_sam.core.pixel_heads import chooses_masks
    from napari_sam.core.predictor import Predictor
    from napari_sam.core.stain import HAEMATOXYLIN

    rng = np.random.default_rng(0)
    image = (rng.random((90, 120)) * 255).astype(np.uint8)
    plain = Predictor(tiny_sam, traced=False)
    plain.set_image(image)
    click = plain.predict(points=[[40, 30]], labels=[1])
    two = plain.predict(points=[[40, 30], [70, 50]], labels=[1, 0])
    boxed = plain.predict(points=[[40, 30]], labels=[1], box=[20, 10, 80, 60])
    refiner = MaskRefiner(4, 3)  # untrained: leaves every mask as SAM made it
    tiny_sam.mask_refiner = refiner
    try:
        assert not chooses_masks(tiny_sam)
        refiner.chooser = _preferring(int(np.argmin(click.iou)))  # never the IoU head's pick
        assert chooses_masks(tiny_sam) and not chooses_masks(tiny_sam, HAEMATOXYLIN)
        choosing = Predictor(tiny_sam, traced=False)
        choosing.set_image(image)
        chosen = choosing.predict(points=[[40, 30]], labels=[1])
        got_two = choosing.predict(points=[[40, 30], [70, 50]], labels=[1, 0])
        got_boxed = choosing.predict(points=[[40, 30]], labels=[1], box=[20, 10, 80, 60])
        # without the pixels (an embedding set alone) the IoU head ranks as before
        choosing.set_embedding(choosing.embedding)
        blind = choosing.predict(points=[[40, 30]], labels=[1])
    finally:
        tiny_sam.mask_refiner = None
    assert chosen.best == int(np.argmin(click.iou)) != click.best
    assert chosen.iou.max() > 0.99 and chosen.iou.min() < 0.01
    np.testing.assert_array_equal(chosen.low_res_logits, click.low_res_logits)  # the masks are SAM's
    np.testing.assert_array_equal(got_two.iou, two.iou)
    np.testing.assert_array_equal(got_boxed.iou, boxed.iou)
    np.testing.assert_array_equal(blind.iou, click.iou)


def test_tiled_clicks_are_chosen_where_the_refiner_does_not_act(tiny_sam):
    from napari_sam.core.embeddings import Embeddings
    from napari_sam.core.prompts import Prompt

    image = (np.random.default_rng(2).random((96, 96)) * 255).astype(np.uint8)
    prompt = Prompt.make([[40, 50]], [1])
    emb = Embeddings(image, tiny_sam, cache=False, axes="YX", magnification=1.0)
    plain = emb.decode_tile(0, (0, 0), np.array([[40.0, 50.0]]), np.array([1]), None, None, True, choose=True)
    shown_plain = emb.segment(0, prompt, multimask=True).to_full((96, 96))
    refiner = MaskRefiner(4, 3)
    with torch.no_grad():
        refiner.body[-1].bias.fill_(8.0)  # a refiner that would grow every mask it refines
    tiny_sam.mask_refiner = refiner
    # the 96-pixel plane fills the input: enlarged past the limit where the refiner stops
    tiny_sam.metadata = {"mask_refiner": {"refine_below_magnification": 2.0}}
    shown = {}
    try:
        for k in range(3):
            refiner.chooser = _preferring(k)
            emb = Embeddings(image, tiny_sam, cache=False, axes="YX", magnification=1.0)
            chosen = emb.decode_tile(0, (0, 0), np.array([[40.0, 50.0]]), np.array([1]), None, None, True,
                                     choose=True)
            assert chosen.best == k
            np.testing.assert_array_equal(chosen.masks, plain.masks)  # chosen, not refined
            # unless asked to choose, or for two clicks, the tile answers with the IoU head's values
            unasked = emb.decode_tile(0, (0, 0), np.array([[40.0, 50.0]]), np.array([1]), None, None, True)
            np.testing.assert_array_equal(unasked.iou, plain.iou)
            two = emb.decode_tile(0, (0, 0), np.array([[40.0, 50.0], [60.0, 20.0]]), np.array([1, 1]), None,
                                  None, True, choose=True)
            assert not np.allclose(np.sort(two.iou), [0, 0, 1], atol=0.01)
            shown[k] = emb.segment(0, prompt, multimask=True).to_full((96, 96))
    finally:
        tiny_sam.mask_refiner = None
        tiny_sam.metadata = {}
    # what a click shows follows the chooser: the IoU head's own pick shows what it showed
    np.testing.assert_array_equal(shown[int(plain.best)], shown_plain)
    assert any(not np.array_equal(shown[k], shown_plain) for k in range(3) if k != plain.best)


def test_only_the_clicks_own_tile_is_ranked_by_the_chooser_never_a_correction_or_a_tile_it_runs_into(tiny_sam):
    from napari_sam.core.embeddings import Embeddings
    from napari_sam.core.prompts import Prompt

    # a plane of several tiles, clicked near a tile corner so that the answer runs on
    image = (np.random.default_rng(4).random((300, 300)) * 255).astype(np.uint8)
    refiner = MaskRefiner(4, 3)
    refiner.chooser = _preferring(2)
    tiny_sam.mask_refiner = refiner
    try:
        emb = Embeddings(image, tiny_sam, cache=False, axes="YX", magnification=1.0, tile=128, halo=32)
        assert len(emb.grid) > 1
        corner = emb.grid[(0, 0)].inner
        click = [[corner[3] - 2.0, corner[1] - 2.0]]
        calls = []
        decode = emb.decode_tile

        def recording(*args, **kwargs):
            calls.append((args[1], kwargs.get("choose", args[8] if len(args) > 8 else False)))
            return decode(*args, **kwargs)

        emb.decode_tile = recording
        first = emb.segment(0, Prompt.make(click, [1]), multimask=True)
        asked_first = list(calls)
        calls.clear()
        emb.segment(0, Prompt.make([*click, [corner[3] - 30.0, corner[1] - 30.0]], [1, 0], previous=first))
        asked_correction = list(calls)
    finally:
        tiny_sam.mask_refiner = None
    assert len(asked_first) >= 2, "the answer should run on into a neighbouring tile"
    assert asked_first[0][1] is True and not any(choose for _, choose in asked_first[1:])
    assert asked_correction and not any(choose for _, choose in asked_correction)
