"""A session driven from the napari console or a notebook: layers replaced or removed under
it, prompts placed on another plane than the one shown, a cell run twice, a labels layer
drawn elsewhere, a brush painting another label than the selected one."""

import numpy as np
import pytest

from napari_sam.layers import attach
from tests._qt.test_widget import viewer_3d  # noqa: F401 - fixture

pytestmark = pytest.mark.viewer


def test_a_replaced_or_removed_labels_layer_is_refused_not_written_behind(viewer_3d, tiny_checkpoint):  # noqa: F811
    viewer, layer = viewer_3d
    said = []
    session = attach(viewer, layer, model=str(tiny_checkpoint), cache=False, say=said.append)
    viewer.dims.set_current_step(0, 40)
    kept = session.labels_layer.data
    loaded = np.zeros_like(kept)
    loaded[40, 5:9, 5:9] = 7
    session.labels_layer.data = loaded  # the user loads saved labels into the layer
    session.points_layer.add(np.array([[40, 50, 60]]))
    assert session.commit() is None
    assert "'SAM labels' was given other data" in said[-1] and "start the session again" in said[-1]
    assert not kept.any() and set(np.unique(loaded)) == {0, 7}  # neither array was written
    assert session.undo() == []
    viewer.layers.remove(session.labels_layer)
    session.commit()
    assert "was removed from the viewer" in said[-1]
    with pytest.raises(ValueError, match="was removed"):
        session.propagation(1)


def test_an_image_layer_given_other_data_is_not_answered_from_the_old_embedding(viewer_3d, tiny_checkpoint):  # noqa: F811
    viewer, layer = viewer_3d
    session = attach(viewer, layer, model=str(tiny_checkpoint), cache=False, say=lambda text: None)
    viewer.dims.set_current_step(0, 40)
    session.points_layer.add(np.array([[40, 50, 60]]))
    assert session.compute_preview()[2][0].area > 0
    layer.data = np.ascontiguousarray(layer.data[::-1])  # the next field of view, same layer
    with pytest.raises(ValueError, match="'nuclei' was given other data"):
        session.compute_preview()
    with pytest.raises(ValueError, match="given other data"):
        session.segment_everything()


def test_prompts_added_from_the_console_are_committed_on_their_own_plane(viewer_3d, tiny_checkpoint, capsys):  # noqa: F811
    viewer, layer = viewer_3d
    session = attach(viewer, layer, model=str(tiny_checkpoint), cache=False)  # say: printed
    viewer.dims.set_current_step(0, 20)  # the viewer shows plane 20; the point lies on plane 40
    session.points_layer.add(np.array([[40, 50, 60]]))
    commit = session.commit()
    assert commit is not None and commit.plane == (40,) and commit.ids == (1,)
    labels = session.labels_layer.data
    assert (labels[40] == 1).any() and not labels[20].any()
    assert "committed object(s) [1]" in capsys.readouterr().out
    assert len(session.points_layer.data) == 0  # the committed plane's prompts are cleared
    assert session.commit() is None and "nothing to commit" in capsys.readouterr().out


def test_attaching_again_goes_on_in_the_same_labels_layer(viewer_3d, tiny_checkpoint):  # noqa: F811
    viewer, layer = viewer_3d
    first = attach(viewer, layer, model=str(tiny_checkpoint), cache=False, say=lambda text: None)
    viewer.dims.set_current_step(0, 40)
    first.points_layer.add(np.array([[40, 50, 60]]))
    first.commit()
    second = attach(viewer, layer, model=str(tiny_checkpoint), cache=False, say=lambda text: None)  # the cell again
    assert second.labels_layer is first.labels_layer
    assert [ly.name for ly in viewer.layers].count("SAM labels") == 1
    second.points_layer.add(np.array([[40, 10, 10]]))
    assert second.commit().ids == (2,)


def test_a_labels_layer_drawn_elsewhere_than_the_image_is_refused(viewer_3d, tiny_checkpoint):  # noqa: F811
    viewer, layer = viewer_3d
    mine = viewer.add_labels(np.zeros(layer.data.shape, np.uint32), name="mine")  # no scale: drawn elsewhere
    with pytest.raises(ValueError, match="'mine' is drawn at scale"):
        attach(viewer, layer, model=str(tiny_checkpoint), cache=False, labels=mine)
    assert not mine.data.any()


def test_a_brush_painting_another_label_than_the_selected_one_is_noted(viewer_3d, tiny_checkpoint):  # noqa: F811
    viewer, layer = viewer_3d
    session = attach(viewer, layer, model=str(tiny_checkpoint), cache=False, say=lambda text: None)
    viewer.dims.set_current_step(0, 40)
    session.labels_layer.selected_label = 2
    session.labels_layer.paint((40, 80, 80), 77)  # the console paints 77 while 2 is selected
    session.points_layer.add(np.array([[40, 50, 60]]))
    assert session.commit().ids == (78,)


def test_a_layer_of_channels_is_refused_rather_than_segmented_as_planes(make_napari_viewer):
    viewer = make_napari_viewer()
    data = np.zeros((2, 64, 64), np.uint16)
    layer = viewer.add_image(data, axis_labels=("c", "y", "x"))
    with pytest.raises(ValueError, match="holds channels .* one layer each"):
        attach(viewer, layer, model="default")
    from napari_sam.layers.prompt_layers import source_from_layer

    one = viewer.add_image(data[:1], axis_labels=("c", "y", "x"), name="one channel")
    assert source_from_layer(one).plane_shape == (64, 64)  # a single channel is no choice to make
    plain = viewer.add_image(data, name="plain")
    with pytest.raises(ValueError, match="segmented with its own axes"):
        attach(viewer, plain, model="default", channel=1)
