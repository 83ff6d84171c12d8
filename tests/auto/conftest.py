"""Fixtures of the automatic-segmentation tests: a real nuclei crop, a two-tile
embedding of part of it, and the checks every AutomaticResult must pass."""

import numpy as np
import pytest

from napari_sam.core.embeddings import Embeddings


@pytest.fixture(scope="module")
def crop(nuclei_2d):
    image, labels = nuclei_2d
    return image[:96, :128], labels[:96, :128]


@pytest.fixture(scope="module")
def tiled(tiny_sam, crop):
    """A part of the crop embedded as two small tiles side by side, shared by the tests
    (embedding is what costs)."""
    image = crop[0][:48, :96]
    emb = Embeddings(image, tiny_sam, cache=False, tile=48, halo=16)
    assert emb.grid.grid_shape == (1, 2)
    return emb


def _check_result(result, shape):
    labels = result.labels
    assert labels.shape == shape and labels.dtype == np.uint32
    ids = np.unique(labels[labels > 0])
    np.testing.assert_array_equal(ids, np.arange(1, result.n_objects + 1))
    np.testing.assert_array_equal(np.bincount(labels.ravel(), minlength=result.n_objects + 1)[1:], result.area)
    assert len(result.iou) == len(result.stability) == result.n_objects


@pytest.fixture
def check_result():
    """``check_result(result, shape)``: labels of the shape, ids 1..n, areas and scores
    that agree with them."""
    return _check_result
