"""The Annotator's small conveniences for scripts and notebooks: erasing an object, and
what it says about itself."""

import numpy as np

from napari_sam.api import Annotator
from napari_sam.core.masks import PlaneMask


def _square(y0, x0, side=10):
    return PlaneMask((y0, y0 + side, x0, x0 + side), np.ones((side, side), bool), 1.0, ())


def test_erase_clears_one_object_on_one_plane_and_undo_brings_it_back(tiny_model):
    image = np.random.default_rng(0).integers(0, 255, (3, 60, 70), dtype=np.uint8)
    ann = Annotator(image, tiny_model, axes="ZYX", cache=False)
    a, b = ann.commit(1, [_square(5, 5), _square(30, 40)]).ids
    ann.commit(2, [_square(5, 5)], overwrite=True)
    before = np.array(ann.labels)
    done = ann.erase(1, a)
    assert done is not None and done.plane == (1,)
    labels = np.asarray(ann.labels)
    assert not (labels[1] == a).any() and (labels[1] == b).sum() == 100  # the other object keeps its pixels
    np.testing.assert_array_equal(labels[[0, 2]], before[[0, 2]])  # other planes untouched
    assert ann.erase(1, a) is None  # nothing left of it there: no undo step that does nothing
    ann.undo()
    np.testing.assert_array_equal(np.asarray(ann.labels), before)


def test_the_repr_names_the_image_model_labels_and_cache(tiny_model, tmp_path):
    image = np.zeros((2, 40, 50), np.uint16)
    text = repr(Annotator(image, tiny_model, axes="ZYX", cache=False))
    assert text.startswith("Annotator(2x40x50 ZYX uint16") and "model tiny_sam.pth" in text
    assert "labels 2x40x50 uint32 in memory" in text and "cache none (in memory)" in text
    cached = repr(Annotator(image, tiny_model, axes="ZYX", cache=tmp_path / "c.zarr"))
    assert f"cache {tmp_path / 'c.zarr'}" in cached


def test_erase_refuses_ids_that_are_not_whole_numbers_and_an_open_step(tiny_model):
    import pytest

    ann = Annotator(np.zeros((30, 40), np.uint8), tiny_model, cache=False)
    (a,) = ann.commit(0, [_square(5, 5)]).ids
    with pytest.raises(ValueError, match="whole numbers"):
        ann.erase(0, 1.7)
    with ann.writer.one_step():  # a propagation under way: an erase would join its undo step
        with pytest.raises(RuntimeError):
            ann.erase(0, a)
    assert (np.asarray(ann.labels) == a).sum() == 100


def test_the_repr_of_a_zarr_label_image_and_of_a_sam2_only_annotator(tiny_model, tmp_path):
    from tests.core.test_memory_propagation import reference_sam2

    image = np.zeros((2, 40, 50), np.uint8)
    text = repr(Annotator(image, tiny_model, labels=str(tmp_path / "labels.zarr"), axes="ZYX", cache=False))
    assert "labels 2x40x50 uint32 file://" in text and "labels.zarr" in text
    text = repr(Annotator(image, reference_sam2(), axes="ZYX", cache=False))
    assert "model none (tracker sam2_small_seed0)" in text and "cache none" in text
