"""The prompt value: built once where prompts enter, validated there, passed down as is."""

import json

import numpy as np
import pytest

from napari_sam.core.masks import PlaneMask
from napari_sam.core.prompts import Prompt, load_prompts


def test_make_normalises_shapes_and_defaults_labels_to_foreground():
    p = Prompt.make([[10, 20], [30, 40]])
    assert p.points.shape == (2, 2) and p.points.dtype == np.float64
    assert p.labels.tolist() == [1, 1] and p.box is None and p.previous is None
    assert not p.ambiguous and Prompt.make([[1, 2]]).ambiguous and not Prompt.make([[1, 2]], box=[0, 0, 5, 5]).ambiguous
    boxed = Prompt.make(box=(1, 2, 3, 4))
    assert boxed.points.shape == (0, 2) and boxed.box.tolist() == [1, 2, 3, 4]
    assert boxed.predict_kwargs() == {"points": None, "labels": None, "box": boxed.box}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(points=[[1, 2]], labels=[1, 0]), "1 point"),
        (dict(points=[[1, 2]], labels=[2]), "1 \\(foreground\\) or 0"),
        (dict(points=[[np.nan, 2]]), "finite"),
        (dict(box=[1, 2, 3]), "\\(x0, y0, x1, y1\\)"),
        (dict(box=[5, 2, 3, 4]), "x1 > x0"),
        (dict(box=[0, 0, np.inf, 4]), "finite"),
        (dict(points=[[1, 2]], labels=[0]), "box or at least one foreground point"),
        (dict(), "box or at least one foreground point"),
    ],
)
def test_make_refuses_what_describes_no_object(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Prompt.make(**kwargs)


@pytest.mark.parametrize("kwargs, message", [(dict(points=[[1, 2]], labels=[2]), "1 \\(foreground\\) or 0"),
                                             (dict(box=[5, 2, 3, 4]), "x1 > x0")])
def test_the_constructor_validates_as_make_does(kwargs, message):
    # Prompt(points=[[x, y]]) with plain lists used to be accepted and to fail deep in the decoder
    p = Prompt(points=[[3, 4]])
    assert p.points.dtype == np.float64 and p.points.shape == (1, 2) and p.labels.tolist() == [1]
    assert Prompt(box=(0, 0, 4, 4)).box.dtype == np.float64
    with pytest.raises(ValueError, match=message):
        Prompt(**kwargs)


def test_on_plane_checks_bounds_and_clips_the_box():
    p = Prompt.make([[5, 5]], box=[-3, 2, 20, 30]).on_plane((25, 15))
    assert p.box.tolist() == [0, 2, 15, 25]
    with pytest.raises(ValueError, match="outside the 25x15 image"):
        Prompt.make([[15, 5]]).on_plane((25, 15))
    with pytest.raises(ValueError, match="entirely outside"):
        Prompt.make(box=[30, 30, 40, 40]).on_plane((25, 15))


def test_previous_rides_along_but_does_not_change_equality():
    prev = PlaneMask.from_full(np.ones((3, 3), bool))
    a = Prompt.make([[1, 1]], previous=prev)
    assert a.previous is prev
    assert a.on_plane((10, 10)).previous is prev


def test_load_prompts_reads_objects_and_names_the_bad_one(tmp_path):
    good = tmp_path / "p.json"
    good.write_text(json.dumps([{"points": [[1, 2]]}, {"box": [0, 0, 4, 4]},
                                {"points": [[3, 4], [5, 6]], "labels": [1, 0]}]))
    objs = load_prompts(good)
    assert [len(o.points) for o in objs] == [1, 0, 2] and objs[2].labels.tolist() == [1, 0]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"points": [[1, 2]]}, {"points": [[1, 2]], "labels": [0]}]))
    with pytest.raises(ValueError, match="object 1"):
        load_prompts(bad)
