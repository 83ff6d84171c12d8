import numpy as np
import pytest

from napari_sam.core.preprocess import Normalization, prepare_plane, preprocess_shape, to_rgb


def test_percentiles_map_to_0_and_255():
    rng = np.random.default_rng(0)
    img = rng.normal(1000, 50, (200, 200)).astype(np.uint16)
    out = Normalization(low=1, high=99).apply(img)
    lo, hi = np.percentile(img, [1, 99])
    assert out.dtype == np.float32
    assert out.min() == 0 and out.max() == 255
    assert abs((img < lo).mean() - 0.01) < 0.005  # those pixels are the ones clipped to 0
    np.testing.assert_allclose(out[img == img.flat[0]][0], np.clip((img.flat[0] - lo) * 255 / (hi - lo), 0, 255),
                               rtol=1e-5)


def test_uint8_passes_through_by_default_and_fixed_limits_apply():
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(Normalization().apply(img), img.astype(np.float32))
    fixed = Normalization(mode="fixed", limits=(0, 127.5)).apply(img)
    assert fixed[0, 0] == 0 and fixed.max() == 255 and fixed[7, 15] == pytest.approx(127 * 2, rel=1e-6)


def test_limits_from_elsewhere_make_tiles_agree():
    rng = np.random.default_rng(0)
    plane = rng.integers(0, 60000, (100, 100)).astype(np.uint16)
    limits = Normalization().resolve_limits(plane)
    a, _ = prepare_plane(plane[:50], limits=limits, long_side=100)
    b, _ = prepare_plane(plane, limits=limits, long_side=100)
    np.testing.assert_allclose(a[0], b[0, :, :50], atol=1e-4)


@pytest.mark.parametrize("bad", [dict(mode="zscore"), dict(low=50, high=40), dict(mode="fixed")])
def test_bad_normalization_settings(bad):
    with pytest.raises(ValueError):
        Normalization(**bad)


def test_preprocess_shape_matches_official_rounding():
    assert preprocess_shape(600, 800) == (768, 1024)
    assert preprocess_shape(300, 500) == (614, 1024)
    assert preprocess_shape(1024, 1024) == (1024, 1024)
    assert preprocess_shape(5000, 20) == (1024, 4)


def test_resize_shrinks_and_grows():
    x, size = prepare_plane(np.zeros((2048, 1000), np.uint16))
    assert x.shape == (1, 3, 1024, 500) and size == (2048, 1000)
    x, size = prepare_plane(np.zeros((100, 50), np.uint16))
    assert x.shape == (1, 3, 1024, 512)


def test_to_rgb_channel_choice():
    img = np.stack([np.full((4, 4), i) for i in range(5)], axis=-1)
    rgb = to_rgb(img, channel_axis=-1, channel=3)
    assert rgb.shape == (4, 4, 3) and (rgb == 3).all()
    rgb = to_rgb(np.moveaxis(img, -1, 0), channel_axis=0, channel=-1)
    assert (rgb == 4).all()
    with pytest.raises(ValueError, match="does not exist"):
        to_rgb(img, channel_axis=-1, channel=5)
