"""Prompts from any numbers: a valid Prompt (whose box ends up inside the plane) or the
documented ValueError, never another exception."""

import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from napari_sam.core.prompts import Prompt

# coordinates anywhere: inside, negative, far outside, and not numbers at all
coord = st.one_of(
    st.floats(-20, 80, allow_nan=False),
    st.sampled_from([math.nan, math.inf, -math.inf, -1e300, 1e300]),
    st.integers(-50, 100),
)
label = st.one_of(st.sampled_from([0, 1]), st.sampled_from([-1, 2, 0.5, math.nan, True]))


def _valid(points, labels, box):
    """The documented rules of Prompt.make, written out independently."""
    if len(points) % 2:
        return False
    n = len(points) // 2
    lbl = [1] * n if labels is None else labels
    if len(lbl) != n or not all(v in (0, 1) and not isinstance(v, float) or v in (0.0, 1.0) for v in lbl):
        return False
    if not all(math.isfinite(v) for v in points):
        return False
    if box is not None:
        if len(box) != 4 or not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
            return False
    return box is not None or any(v == 1 for v in lbl)


@given(points=st.lists(coord, max_size=7), labels=st.none() | st.lists(label, max_size=4),
       box=st.none() | st.lists(coord, min_size=3, max_size=5))
@example(points=[1, 2], labels=[0.5], box=[0, 0, 5, 5])  # not a label: not rounded to one
@example(points=[1, 2], labels=[math.nan], box=None)
@example(points=[1, 2, 3], labels=None, box=None)  # an odd number of coordinates
def test_make_builds_a_valid_prompt_or_raises_value_error(points, labels, box):
    if not _valid(points, labels, box):
        with pytest.raises(ValueError):
            Prompt.make(points, labels, box)
        return
    p = Prompt.make(points, labels, box)
    assert p.points.shape == (len(points) // 2, 2) and p.points.dtype == np.float64
    assert p.labels.dtype == np.int64 and set(p.labels.tolist()) <= {0, 1}
    assert p.box is None or (p.box[2] > p.box[0] and p.box[3] > p.box[1])


@given(points=st.lists(st.tuples(coord, coord), max_size=3),
       box=st.none() | st.tuples(coord, coord, coord, coord),
       shape=st.tuples(st.integers(1, 60), st.integers(1, 60)))
def test_on_plane_clips_the_box_inside_or_names_what_is_outside(points, box, shape):
    try:
        prompt = Prompt.make(points or None, None, box)
    except ValueError:
        return  # make's own rules, checked above
    H, W = shape
    inside = all(0 <= x < W and 0 <= y < H for x, y in points)
    box_meets = box is None or (box[2] > 0 and box[0] < W and box[3] > 0 and box[1] < H)
    if not (inside and box_meets):
        with pytest.raises(ValueError, match="outside"):
            prompt.on_plane(shape)
        return
    on = prompt.on_plane(shape)
    assert np.array_equal(on.points, prompt.points) and np.array_equal(on.labels, prompt.labels)
    if box is not None:
        x0, y0, x1, y1 = on.box
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
