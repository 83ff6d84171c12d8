"""Stained brightfield read as its haematoxylin channel (napari_sam.core.stain) wherever a
model asks for it: image sources, the embeddings, the predictor, training, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import hed2rgb

from napari_sam.core.embeddings import Embeddings
from napari_sam.core.image_source import ImageSource
from napari_sam.core.models import load_model
from napari_sam.core.predictor import Predictor
from napari_sam.core.preprocess import Normalization, prepare_plane, to_rgb
from napari_sam.core.stain import channel_for, haematoxylin, looks_brightfield, stain_advice


def _he_image(seed: int = 0, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB H&E-like image, its haematoxylin concentration): round nuclei of
    haematoxylin on eosin-stained tissue, made with the stain vectors rgb2hed inverts."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    h = np.zeros((size, size))
    for _ in range(6):
        cy, cx, r = rng.uniform(10, size - 10), rng.uniform(10, size - 10), rng.uniform(5, 9)
        h[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0.5, 0.9)
    e = 0.15 + 0.05 * rng.random((size, size))
    rgb = hed2rgb(np.stack([h, e, np.zeros_like(h)], axis=-1))
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8), h


def _fluorescence_rgb(size: int = 96) -> np.ndarray:
    """A green-and-magenta composite: bright nuclei on a black ground."""
    img = np.zeros((size, size, 3), np.uint8)
    img[20:40, 20:40, 1] = 200
    img[60:80, 50:70, 0] = img[60:80, 50:70, 2] = 180
    return img


@pytest.fixture
def advised(tiny_checkpoint):
    """The tiny SAM with the default model's stain advice (a fresh copy per test)."""
    model = load_model(tiny_checkpoint, device="cpu", dtype="float32")
    model.metadata = dict(model.metadata, stain="haematoxylin")
    return model


def test_haematoxylin_follows_the_stain():
    rgb, h = _he_image()
    got = haematoxylin(rgb)
    assert got.shape == h.shape and got.dtype == np.float32
    assert np.corrcoef(got.ravel(), h.ravel())[0, 1] > 0.9  # uint8 rounding and saturation cost the rest
    nuclei = h > 0
    assert got[nuclei].mean() > 5 * max(got[~nuclei].mean(), 1e-3)
    # floats in 0-1, floats on 0-255 and RGBA read alike
    assert np.allclose(haematoxylin(rgb / 255.0), got, atol=1e-5)
    assert np.allclose(haematoxylin(rgb.astype(np.float32)), got, atol=1e-5)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    assert np.array_equal(haematoxylin(rgba), got)
    with pytest.raises(ValueError, match="2 channels"):
        haematoxylin(rgb[..., :2])


def test_brightfield_is_told_from_fluorescence():
    assert looks_brightfield(_he_image()[0])
    assert not looks_brightfield(_fluorescence_rgb())
    assert not looks_brightfield(np.zeros((8, 8, 3), np.uint8))


def test_the_advice_applies_to_stained_rgb_only(advised, tiny_model):
    he = _he_image()[0]
    assert stain_advice(advised) == "haematoxylin" and stain_advice(tiny_model) is None
    assert channel_for(advised, None, True, he) == "haematoxylin"
    assert channel_for(advised, None, True, _fluorescence_rgb()) is None
    assert channel_for(advised, None, False, he) is None  # not RGB
    assert channel_for(advised, "rgb", True, he) == "rgb"  # the user's choice stands
    assert channel_for(advised, 1, True, he) == 1
    assert channel_for(tiny_model, None, True, he) is None
    advised.metadata = dict(advised.metadata, stain="eosin")
    with pytest.raises(ValueError, match="eosin"):
        stain_advice(advised)


def test_named_channels_in_preprocessing():
    rgb, _ = _he_image()
    out = to_rgb(rgb, channel="haematoxylin")
    assert out.shape == rgb.shape and out.dtype == np.float32
    assert np.array_equal(out[..., 0], haematoxylin(rgb)) and np.array_equal(out[..., 0], out[..., 2])
    assert np.array_equal(to_rgb(rgb, channel="rgb"), rgb)
    chw = np.moveaxis(rgb, -1, 0)
    assert np.array_equal(to_rgb(chw, channel_axis=0, channel="haematoxylin"), out)
    with pytest.raises(ValueError, match="needs an RGB"):
        to_rgb(rgb[..., 0], channel="haematoxylin")
    with pytest.raises(ValueError, match="'eosin' is not"):
        to_rgb(rgb, channel="eosin")
    # floats are stretched by percentiles (the auto normalisation), not passed as they are
    x, _ = prepare_plane(rgb, Normalization(), channel="haematoxylin", long_side=96)
    assert float(x.min()) == 0.0 and float(x.max()) == 255.0


def test_image_source_reads_the_stain():
    rgb, _ = _he_image()
    volume = np.stack([rgb, rgb[::-1]])  # ZYXC
    src = ImageSource(volume, "ZYXC", channel="haematoxylin")
    assert src.stain == "haematoxylin" and src.dtype == np.float32
    plane = src.read(1, (10, 50, 5, 70))
    assert plane.shape == (40, 65) and plane.dtype == np.float32
    assert np.array_equal(plane, haematoxylin(rgb[::-1][10:50, 5:70]))
    lo, hi = src.intensity_limits(Normalization())
    h = haematoxylin(volume)
    assert np.isclose(lo, np.percentile(h, 1), atol=1e-3) and np.isclose(hi, np.percentile(h, 99.8), atol=1e-2)
    assert "haematoxylin" in src.describe()
    assert ImageSource(volume, "ZYXC").with_channel("haematoxylin").stain == "haematoxylin"
    assert ImageSource(volume, "ZYXC", channel="rgb").read(0).shape == rgb.shape
    with pytest.raises(ValueError, match="no C axis of 3 or 4"):
        ImageSource(volume[..., 0], "ZYX", channel="haematoxylin")
    with pytest.raises(ValueError, match="not a channel number"):
        ImageSource(volume, "ZYXC", channel="dapi")


def test_embeddings_follow_the_advice(advised, tiny_model):
    he = _he_image()[0]
    emb = Embeddings(he, advised, cache=False, axes="YXC", magnification=1.0)
    assert emb.source.channel == "haematoxylin" and emb.signature.channel == "haematoxylin"
    grey = Embeddings(haematoxylin(he), advised, cache=False, axes="YX", magnification=1.0)
    assert np.allclose(emb.limits, grey.limits, atol=1e-4)
    np.testing.assert_allclose(emb.embedding_for(0).features.numpy(), grey.embedding_for(0).features.numpy(),
                               atol=1e-4)
    # a fluorescence composite, the user's "rgb" and a model without the advice keep the colours
    assert Embeddings(_fluorescence_rgb(), advised, cache=False, axes="YXC").source.channel is None
    assert Embeddings(he, advised, cache=False, axes="YXC", channel="rgb").source.channel == "rgb"
    plain = Embeddings(he, tiny_model, cache=False, axes="YXC", magnification=1.0)
    assert plain.source.channel is None
    assert not np.allclose(plain.embedding_for(0).features.numpy(), emb.embedding_for(0).features.numpy())


def test_a_cache_never_mixes_the_colours_and_the_stain(advised, tmp_path):
    he = _he_image()[0]
    cache = tmp_path / "c.zarr"
    stained = Embeddings(he, advised, cache=cache, axes="YXC", magnification=1.0)
    stained.compute_all(progress=False)
    colours = Embeddings(he, advised, cache=cache, axes="YXC", channel="rgb", magnification=1.0, on_mismatch="beside")
    assert colours.store.key != stained.store.key
    assert not colours.is_cached(0)


def test_predictor_follows_the_advice(advised, tiny_model):
    he = _he_image()[0]
    a = Predictor(advised).set_image(he).features
    b = Predictor(advised).set_image(haematoxylin(he)).features
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    c = Predictor(advised).set_image(he, channel="rgb").features
    assert not torch.allclose(a, c, atol=1e-3)
    d = Predictor(tiny_model).set_image(he).features
    torch.testing.assert_close(c, d, atol=1e-5, rtol=0)


def test_training_embeds_as_the_plugin_reads(advised):
    from napari_sam.train.config import TrainingConfig
    from napari_sam.train.dataset import SegmentationDataset
    from napari_sam.train.features import TrainingEmbeddings

    he, h = _he_image()
    labels = (h > 0).astype(np.int32)
    data = SegmentationDataset.from_arrays([he], [labels])
    got = TrainingEmbeddings(advised, TrainingConfig(mode="decoder"), torch.device("cpu")).get(data, 0, grad=False)
    want = Predictor(advised).set_image(haematoxylin(he)).features
    torch.testing.assert_close(got.features.float(), want, atol=1e-4, rtol=0)


def test_cli_names_the_stain(tmp_path, capsys):
    from napari_sam.cli import main
    from napari_sam.cli.parser import build_parser

    args = build_parser().parse_args(["segment", "img.tif", "--point", "1", "1",
                                      "--channel", "haematoxylin"])
    assert args.channel == "haematoxylin"
    assert build_parser().parse_args(["embed", "img.tif", "--channel", "2"]).channel == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["embed", "img.tif", "--channel", "dapi"])
    two = tmp_path / "two.npy"
    np.save(two, np.zeros((32, 32, 2), np.uint8))
    assert main(["segment", str(two), "--point", "1", "1", "--channel", "haematoxylin", "--model", "x.pth",
                 "--out", str(tmp_path / "o.tif")]) == 2  # refused before the model (x.pth) is looked for
    assert "needs an RGB(A) image" in capsys.readouterr().err


def test_tiles_of_a_float_image_are_scaled_alike():
    # 0-1 floats with one pixel a little over 1: every tile must use the same white
    rgb = _he_image()[0].astype(np.float32) / 255
    rgb[5, 5] = 1.02
    src = ImageSource(rgb, "YXC", channel="haematoxylin")
    whole = src.read(0)
    for region in ((0, 48, 0, 48), (48, 96, 48, 96)):
        y0, y1, x0, x1 = region
        np.testing.assert_array_equal(src.read(0, region), whole[y0:y1, x0:x1])
    assert abs(float(np.median(whole)) - float(np.median(haematoxylin(rgb[8:, 8:])))) < 0.02


def test_channels_first_images_sample_their_stain():
    volume = np.stack([_he_image(1)[0], _he_image(2)[0]])  # ZYXC
    last = ImageSource(volume, "ZYXC", channel="haematoxylin")
    first = ImageSource(np.moveaxis(volume, -1, 1), "ZCYX", channel="haematoxylin")
    assert first.intensity_limits(Normalization()) == pytest.approx(last.intensity_limits(Normalization()))
    np.testing.assert_array_equal(first.read(1), last.read(1))


def test_fixed_limits_keep_the_colours(advised, tiny_model):
    he = _he_image()[0]
    fixed = Normalization(mode="fixed", limits=(0.0, 255.0))
    assert Embeddings(he, advised, cache=False, axes="YXC", normalization=fixed).source.channel is None
    a = Predictor(advised).set_image(he, limits=(0.0, 255.0)).features
    b = Predictor(tiny_model).set_image(he, limits=(0.0, 255.0)).features
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_augmented_views_read_the_plane_as_it_is_read(advised):
    from napari_sam.auto.augmentation import _in_memory

    he = _he_image()[0]
    colours = Embeddings(he, advised, cache=False, axes="YXC", channel="rgb", magnification=1.0)
    view = _in_memory(colours, 0, colours.source.read(0), (1,), 1.5)
    assert view.source.channel == "rgb" and view.source.read(0).shape == he.shape
    stained = Embeddings(he, advised, cache=False, axes="YXC", magnification=1.0)
    view = _in_memory(stained, 0, stained.source.read(0), (1,), 1.5)
    np.testing.assert_array_equal(view.source.read(0), stained.source.read(0)[:, ::-1])
