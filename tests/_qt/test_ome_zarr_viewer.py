"""OME-Zarr pyramids in the viewer, as a user meets them: the image opened with
napari-ome-zarr, the widget started with "labels into the image's OME-Zarr", a nucleus
clicked and committed, and the label image read back with ome-zarr-py at two levels."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

pytestmark = pytest.mark.viewer

DATA = Path(__file__).resolve().parents[2] / "src" / "napari_sam" / "_data"


def _pyramid(path: Path, image: np.ndarray, version: str) -> Path:
    """An OME-Zarr image with ome-zarr-py's own writer (its default pyramid of 2x levels)."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt = FormatV05() if version == "0.5" else FormatV04()
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    write_image(image, root, axes="yx", fmt=fmt)
    return path


def _snapshot(path: Path) -> dict:
    """Every file of the container outside labels/, with its bytes."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and "labels" not in p.relative_to(path).parts}


def _read_labels(path: Path, name: str) -> tuple[list[np.ndarray], dict]:
    """The label image's levels and metadata as ome-zarr-py reads them."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    # read from the image, as a viewer opening it does: the labels are found from there
    nodes = list(Reader(parse_url(str(path)))())
    node = next(n for n in nodes if "image-label" in n.zarr.root_attrs and n.zarr.basename() == name)
    return [np.asarray(level) for level in node.data], node.metadata


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_pyramid_opened_with_napari_ome_zarr_click_commit_and_read_back_at_two_levels(
        make_napari_viewer, tmp_path, qtbot, version):
    from napari_sam._qt.widget import SamWidget
    from napari_sam.core.prompt_simulation import interior_point

    image = tifffile.imread(DATA / "nuclei_2d.tif")
    truth = tifffile.imread(DATA / "nuclei_2d_labels.tif")
    path = _pyramid(tmp_path / "nuclei.ome.zarr", image, version)
    before = _snapshot(path)

    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-ome-zarr")
    layer = viewer.layers[-1]
    assert layer.multiscale and len(layer.data) > 2

    widget = SamWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.image.value is layer
    assert not widget.ngff_labels.native.isHidden() and not widget.ngff_labels.value  # offered, not chosen
    widget.ngff_labels.value = True
    widget.start_session()
    qtbot.waitUntil(lambda: widget.session is not None, timeout=60000)
    session = widget.session
    # the image is read through its store (the cache beside it is the CLI's), at full resolution
    assert isinstance(session.annotator.source.array, zarr.Array)
    assert session.annotator.source.plane_shape == image.shape
    assert session.labels_layer.multiscale and len(session.labels_layer.data) == len(layer.data)
    assert [tuple(level.shape) for level in session.labels_layer.data] == [tuple(d.shape) for d in layer.data]

    # a medium-sized nucleus, boxed as a user drags a rectangle around it
    ids, areas = np.unique(truth[truth > 0], return_counts=True)
    target = int(ids[np.argsort(areas)[len(areas) // 2]])
    x, y = interior_point(truth == target)
    rows, cols = np.nonzero(truth == target)
    session.boxes_layer.add_rectangles(np.array([[rows.min() - 1, cols.min() - 1], [rows.max() + 1, cols.max() + 1]],
                                                float))  # napari order (row, col); scale 1
    qtbot.waitUntil(lambda: session.preview_is_current() and not widget.workers.busy and not widget._preview_running,
                    timeout=60000)
    widget.commit.clicked()
    qtbot.waitUntil(lambda: not widget.workers.busy and np.asarray(session.labels_layer.data[0]).any(),
                    timeout=60000)

    levels, metadata = _read_labels(path, "napari-sam")
    assert len(levels) == len(layer.data)
    full = levels[0]
    assert full.shape == image.shape and set(np.unique(full)) == {0, 1}
    assert full[int(round(y)), int(round(x))] == 1
    iou = ((full == 1) & (truth == target)).sum() / ((full == 1) | (truth == target)).sum()
    print(f'IoU {iou:.3f}')
    assert iou > 0.6, iou
    # the lower level holds the object too, sampled from the full-resolution labels
    assert levels[1].shape == tuple(layer.data[1].shape) and (levels[1] == 1).any()
    rows = np.minimum((np.arange(levels[1].shape[0]) + 0.5) * image.shape[0] / levels[1].shape[0], image.shape[0] - 1)
    cols = np.minimum((np.arange(levels[1].shape[1]) + 0.5) * image.shape[1] / levels[1].shape[1], image.shape[1] - 1)
    np.testing.assert_array_equal(levels[1], full[np.ix_(rows.astype(int), cols.astype(int))])
    assert [a["name"] for a in metadata["axes"]] == ["y", "x"]
    assert _snapshot(path) == before  # the image's arrays and metadata are untouched

    # napari-ome-zarr shows the new label image over the image when the container is opened again
    viewer2 = make_napari_viewer()
    viewer2.open(str(path), plugin="napari-ome-zarr")
    kinds = {type(la).__name__ for la in viewer2.layers}
    assert kinds == {"Image", "Labels"}
    shown = next(la for la in viewer2.layers if type(la).__name__ == "Labels")
    assert shown.multiscale and np.asarray(shown.data[1]).max() == 1

    widget.undo.clicked()
    assert not any(level.any() for level in _read_labels(path, "napari-sam")[0])  # undone at every level


def test_a_multiscale_layer_with_scale_and_translate_segments_at_full_resolution_in_world_coordinates(
        make_napari_viewer, tiny_checkpoint):
    from napari_sam.layers import attach

    image = tifffile.imread(DATA / "nuclei_2d.tif")
    viewer = make_napari_viewer()
    layer = viewer.add_image([image, image[::2, ::2], image[::4, ::4]], multiscale=True, scale=(0.5, 0.25),
                             translate=(100.0, -40.0), name="pyramid")
    session = attach(viewer, layer, model=str(tiny_checkpoint), cache=False)
    assert session.annotator.source.plane_shape == image.shape  # level 0, not the level on screen
    assert session.labels_layer.data.shape == image.shape
    np.testing.assert_allclose(session.labels_layer.scale, layer.scale)
    np.testing.assert_allclose(session.labels_layer.translate, layer.translate)

    # a click given in world coordinates (what the canvas reports) lands on pixel (row 200, col 300)
    world = np.array([100.0 + 200 * 0.5, -40.0 + 300 * 0.25])
    session.points_layer.add(session.points_layer.world_to_data(world)[None])
    (prompt,) = session.prompts()
    np.testing.assert_allclose(prompt.points, [[300, 200]])  # (x, y) pixels of level 0
    session.show_preview(session.compute_preview())
    mask = session.preview_masks[0]
    y0, _, x0, _ = mask.region
    # the preview crop sits where its pixels are, in the world, whatever the zoom shows
    np.testing.assert_allclose(session.preview_layer.translate, [100.0 + y0 * 0.5, -40.0 + x0 * 0.25])
    np.testing.assert_allclose(session.preview_layer.scale, layer.scale)
    session.commit()
    labels = np.asarray(session.labels_layer.data)
    assert (labels == 1).sum() == mask.area and labels[200, 300] == mask.to_full(image.shape)[200, 300]
