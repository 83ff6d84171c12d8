"""Images of any dtype and shape, and axes strings of any letters: each either works or
raises ValueError with a message, never another exception."""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_sam.core.image_source import AXES, ImageSource, guess_axes
from napari_sam.core.preprocess import Normalization, to_rgb

DTYPES = [np.bool_, np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64]
shapes = hnp.array_shapes(min_dims=1, max_dims=5, min_side=1, max_side=5)


@st.composite
def images(draw, shape=shapes):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(shape)
    if dtype.kind == "f":
        elements = st.floats(-1e6, 1e6, width=dtype.itemsize * 8) | st.sampled_from([np.nan])
    elif dtype.kind == "b":
        elements = st.booleans()
    else:
        info = np.iinfo(dtype)
        elements = st.integers(int(info.min), int(info.max))
    return draw(hnp.arrays(dtype, shape, elements=elements))


@given(image=images(), channel_axis=st.none() | st.integers(-1, 3), channel=st.none() | st.integers(-1, 4))
def test_to_rgb_gives_three_channels_of_the_plane_or_value_error(image, channel_axis, channel):
    try:
        rgb = to_rgb(image, channel_axis, channel)
    except ValueError as err:
        assert str(err)
        return
    assert rgb.shape == image.shape[:2] + (3,) or rgb.shape[-1] == 3
    assert rgb.dtype == image.dtype
    flat = set(np.unique(image[~np.isnan(image)] if image.dtype.kind == "f" else image).tolist())
    seen = rgb[~np.isnan(rgb)] if rgb.dtype.kind == "f" else rgb
    assert set(np.unique(seen).tolist()) <= flat  # values are taken from the image, never invented


percent = st.floats(0, 100) | st.sampled_from([-1.0, 101.0, np.nan])


@given(image=images(hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6)),
       mode=st.sampled_from(["auto", "percentile", "fixed", "none", "other"]),
       low=percent, high=percent,
       limits=st.none() | st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)))
@example(image=np.array([[np.nan, 1], [2, 3]], np.float32), mode="auto", low=1, high=99, limits=None)
@example(image=np.eye(3, dtype=bool), mode="auto", low=1, high=99, limits=None)  # was a TypeError
@example(image=np.full((2, 2), np.nan), mode="percentile", low=1, high=99, limits=None)
def test_normalization_maps_any_dtype_into_0_255_or_refuses_with_value_error(image, mode, low, high, limits):
    try:
        norm = Normalization(mode, low, high, limits)
        out = norm.apply(image)
    except ValueError as err:
        assert str(err)
        return
    assert out.dtype == np.float32 and out.shape == image.shape
    if norm.mode in ("percentile", "fixed") or (norm.mode == "auto" and image.dtype != np.uint8):
        # stretched: finite values in range, a NaN pixel is background, not a NaN plane
        assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 255


axes_strings = st.text(alphabet="TZCYXQtzyx", min_size=0, max_size=6)


@given(image=images(), axes=st.none() | axes_strings, channel=st.none() | st.integers(-1, 5))
def test_image_source_opens_or_says_why_not(image, axes, channel):
    try:
        src = ImageSource(image, axes, channel)
    except ValueError as err:
        assert str(err)
        return
    assert len(src.axes) == image.ndim and set(src.axes) <= set(AXES) and {"Y", "X"} <= set(src.axes)
    assert src.n_planes == int(np.prod(src.plane_grid))
    plane = src.read(src.n_planes - 1)
    assert plane.shape[:2] == src.plane_shape


@given(shape=st.lists(st.integers(1, 6), min_size=0, max_size=7))
def test_guess_axes_names_every_axis_or_raises_value_error(shape):
    if not 2 <= len(shape) <= 5:
        with pytest.raises(ValueError, match="name them"):
            guess_axes(tuple(shape))
        return
    axes = guess_axes(tuple(shape))
    assert len(axes) == len(shape) and axes.endswith(("YX", "YXC")) and len(set(axes)) == len(axes)
    ImageSource(np.zeros(shape, np.uint8), channel=0 if axes == "TCZYX" else None)  # and opens
