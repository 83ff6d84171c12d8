"""The image refiner of the default model's instance decoder: an untrained one changes
nothing, a trained one reads the image, its keys load back, and a decoder that needs the
image refuses to run without it."""

from __future__ import annotations

import pytest
import torch

from napari_sam.model.instance_decoder import InstanceDecoder, InstanceDecoderConfig, instance_decoder_from_state_dict


def _decoders(width: int = 6, depth: int = 4):
    torch.manual_seed(0)
    plain = InstanceDecoder(InstanceDecoderConfig(initial_features=4, scale=4, transposed=True)).eval()
    refining = InstanceDecoder(InstanceDecoderConfig(initial_features=4, scale=4, transposed=True,
                                                     refine_width=width, refine_depth=depth)).eval()
    missing = refining.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("refine.") for k in missing)
    return plain, refining


def _inputs(seed: int = 1, side: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 256, side, side, generator=g), torch.randn(2, 3, 16 * side, 16 * side, generator=g)


def test_an_untrained_refiner_leaves_the_maps_as_they_were():
    plain, refining = _decoders()
    embedding, image = _inputs()
    assert not plain.needs_image and refining.needs_image
    with torch.no_grad():
        expected, refined = plain.maps(embedding), refining.maps(embedding, image)
    assert refined.shape == expected.shape == (2, 3, 64, 64)
    torch.testing.assert_close(refined, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("depth", [4, 5])
def test_a_trained_refiner_reads_the_image_and_its_keys_load_back(depth):
    _, refining = _decoders(depth=depth)
    with torch.no_grad():
        for p in refining.refine.parameters():
            p.normal_(0, 0.3)
    embedding, image = _inputs()
    with torch.no_grad():
        a = refining.maps(embedding, image)
        b = refining.maps(embedding, image.flip(-1))
        assert (a - b).abs().max() > 1e-3  # the maps follow the image
        # a grey input repeated on three channels reads like its channel mean
        grey = image.mean(1, keepdim=True).expand(-1, 3, -1, -1)
        torch.testing.assert_close(refining.maps(embedding, grey), a, rtol=0, atol=1e-5)
    loaded = instance_decoder_from_state_dict(refining.state_dict())
    assert loaded.config.refine_width == 6 and loaded.config.refine_depth == depth and loaded.needs_image
    assert len(refining.refine.body) == 2 * depth + 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.maps(embedding, image), a, rtol=0, atol=0)
        full = loaded(embedding, (64, 48), (100, 75), 64, image=image)
    assert full.shape == (2, 3, 100, 75)


def test_a_decoder_that_needs_the_image_refuses_to_run_without_it():
    plain, refining = _decoders()
    embedding, image = _inputs()
    with pytest.raises(ValueError, match=r"takes the model input \(2, 3, 64, 64\) beside the embedding, not None"):
        refining.maps(embedding)
    with pytest.raises(ValueError, match=r"not \(2, 3, 32, 32\)"):
        refining.maps(embedding, image[..., :32, :32])
    with pytest.raises(ValueError, match="refine_width must be at least 0, not -1"):
        InstanceDecoderConfig(refine_width=-1)
    with pytest.raises(ValueError, match="refine_depth must be at least 2, not 1"):
        InstanceDecoderConfig(refine_width=4, refine_depth=1)
    # micro-sam's decoders ignore an image
    with torch.no_grad():
        torch.testing.assert_close(plain.maps(embedding, image), plain.maps(embedding), rtol=0, atol=0)


@pytest.mark.parametrize("depth", [4, 5])
@pytest.mark.parametrize("window", [(10, 40, 5, 61), (0, 128, 0, 128), (0, 17, 111, 128), (30, 31, 30, 31)])
def test_a_window_is_refined_exactly_as_the_whole_input(window, depth):
    _, refining = _decoders(depth=depth)
    with torch.no_grad():
        for p in refining.refine.parameters():
            p.normal_(0, 0.3)
    embedding, image = _inputs(2, side=8)
    r0, r1, c0, c1 = window
    with torch.no_grad():
        whole = refining.maps(embedding, image)
        part = refining.maps(embedding, image, window)
    torch.testing.assert_close(part[..., r0:r1, c0:c1], whole[..., r0:r1, c0:c1], rtol=0, atol=1e-5)
    if window == (10, 40, 5, 61):  # far outside the window the decoder's own (enlarged) maps stand
        plain = torch.sigmoid(torch.nn.functional.interpolate(refining.head(embedding)[1], (128, 128),
                                                              mode="bilinear"))
        torch.testing.assert_close(part[..., 100:, :], plain[..., 100:, :], rtol=0, atol=1e-6)
        assert (part[..., 20:30, 20:50] - plain[..., 20:30, 20:50]).abs().max() > 1e-3  # refined inside
