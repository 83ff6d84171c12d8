"""The plugin's manifest is found by napari and its samples open in a real viewer."""

import numpy as np
import pytest

pytestmark = pytest.mark.viewer


def test_2d_sample_with_labels(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-sam-scale", "nuclei_2d_with_labels")
    image, labels = viewer.layers
    assert image.data.shape == (512, 512) and image.data.dtype == np.uint16
    assert labels.data.shape == (512, 512)
    assert len(np.unique(labels.data)) - 1 == 125


def test_3d_sample_keeps_its_voxel_size(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-sam-scale", "nuclei_3d")
    (image,) = viewer.layers
    assert image.data.shape == (100, 100, 100) and image.data.dtype == np.uint8
    np.testing.assert_allclose(image.scale, (0.284, 0.127, 0.127))


def test_3d_image_and_labels_share_scale_and_units(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-sam-scale", "nuclei_3d_with_labels")
    image, labels = viewer.layers
    assert labels.data.shape == image.data.shape == (100, 100, 100)
    np.testing.assert_allclose(labels.scale, image.scale)
    assert tuple(str(u) for u in labels.units) == tuple(str(u) for u in image.units)
    assert len(np.unique(labels.data)) - 1 == 54
