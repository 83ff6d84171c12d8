"""What a user of the widget must not lose or be shown: hand edits kept by undo and new ids,
one step writing the labels at a time, errors said once in the status line, a second Start
going on in the same labels layer."""

import numpy as np
import pytest

from napari_sam.layers import attach
from tests._qt.test_widget import _idle, viewer_3d, widget  # noqa: F401 - fixtures

pytestmark = pytest.mark.viewer


def test_hand_painted_ids_are_never_given_again_and_undo_keeps_hand_edits(viewer_3d, tiny_checkpoint):  # noqa: F811
    viewer, layer = viewer_3d
    session = attach(viewer, layer, model=str(tiny_checkpoint), cache=False)
    viewer.dims.set_current_step(0, 40)
    session.points_layer.add(np.array([[40, 50, 60]]))
    session.commit()
    labels = session.labels_layer.data
    first = labels[40] == 1
    assert first.any()
    # the user paints object 5 by hand with the brush, over the edge of object 1
    session.labels_layer.selected_label = 5
    rows, cols = np.nonzero(first)
    session.labels_layer.paint((40, int(rows.mean()), int(cols.mean())), 5)
    painted = labels[40] == 5
    assert painted.any()
    session.points_layer.add(np.array([[40, 10, 10]]))
    session.commit()
    assert set(np.unique(labels[40])) == {0, 1, 5, 6}  # the next object is 6, not 5
    session.undo()
    session.undo()
    assert (labels[40] == 5).sum() == painted.sum() and set(np.unique(labels[40])) == {0, 5}


def test_a_commit_of_background_points_alone_is_said_not_raised(viewer_3d, tiny_checkpoint):  # noqa: F811
    viewer, layer = viewer_3d
    said = []
    session = attach(viewer, layer, model=str(tiny_checkpoint), cache=False, say=said.append)
    viewer.dims.set_current_step(0, 40)
    session.points_layer.add(np.array([[40, 50, 60]]))
    session.points_layer.features.loc[0, "positive"] = False
    session.commit()
    assert "foreground point" in said[-1] and not session.labels_layer.data.any() and not session.writing
    # as in the viewer, where a preview is always shown first (an empty one after a slider moves)
    session.points_layer.features.loc[0, "positive"] = True
    session.show_preview(session.compute_preview())
    session.points_layer.features.loc[0, "positive"] = False
    said.clear()
    session.commit()
    assert "foreground point" in said[-1] and not session.labels_layer.data.any() and not session.writing


def test_no_commit_or_undo_while_a_step_writes_the_labels(viewer_3d, tiny_checkpoint):  # noqa: F811
    viewer, layer = viewer_3d
    said = []
    session = attach(viewer, layer, model=str(tiny_checkpoint), cache=False, say=said.append)
    viewer.dims.set_current_step(0, 40)
    session.points_layer.add(np.array([[40, 50, 60]]))
    session.commit()
    session.writing = "a propagation"
    session.points_layer.add(np.array([[40, 10, 10]]))
    session.commit()
    assert session.undo() == [] and said[-1].startswith("a propagation is writing the labels")
    assert set(np.unique(session.labels_layer.data)) == {0, 1}  # nothing committed, nothing undone
    session.writing = ""
    assert [c.ids for c in session.undo()] == [(1,)]


def test_segment_everything_runs_once_at_a_time(widget, viewer_3d, qtbot):  # noqa: F811
    viewer, _ = viewer_3d
    viewer.dims.set_current_step(0, 45)
    widget.everything_mode.value = "boxes"
    assert widget.run_everything() is not None
    assert widget.run_everything() is None and "segment everything is writing the labels" in widget.status.value
    _idle(widget, qtbot)
    assert not widget.session.writing and len(widget.session.annotator.writer.history) == 1


def test_a_failed_step_is_said_once_in_the_status_line(widget, qtbot):  # noqa: F811
    from napari_sam._qt.workers import error_text

    widget.workers.call(lambda: 1 / 0)  # pytest-qt fails the test on an exception raised again in the GUI
    _idle(widget, qtbot)
    assert widget.status.value == "error: division by zero"
    long = RuntimeError("could not download: " + "x" * 500 + "\nand more")
    assert error_text(long).endswith("...") and len(error_text(long)) == len("error: ") + 200


def test_starting_again_goes_on_in_the_same_labels_layer(widget, viewer_3d, qtbot):  # noqa: F811
    viewer, _ = viewer_3d
    session = widget.session
    viewer.dims.set_current_step(0, 50)
    session.points_layer.add(np.array([[50, 40, 60]]))
    widget.commit.clicked()
    qtbot.waitUntil(lambda: session.labels_layer.data[50].any(), timeout=60000)
    _idle(widget, qtbot)
    widget.start_session()  # another model, a new magnification: the same image
    qtbot.waitUntil(lambda: widget.session is not session and widget.start.enabled, timeout=60000)
    again = widget.session
    assert again.labels_layer is session.labels_layer and again.annotator.writer.next_id() == 2
    assert sum(1 for layer in viewer.layers if layer.name.startswith("SAM labels")) == 1
    # the committed plane stays a prompted plane: a propagation of the new session never rewrites it
    assert again.tracker.prompted == {1: {(50,)}}
    again.writing = "a propagation"  # Start while it writes would make a second writer of the same layer
    widget.start_session()
    assert widget.session is again and widget.start.enabled and "a propagation is writing" in widget.status.value
    again.writing = ""


def test_prompt_layers_of_an_earlier_image_of_other_axes_are_replaced(make_napari_viewer, nuclei_2d, nuclei_3d,
                                                                       tiny_checkpoint):
    viewer = make_napari_viewer()
    volume = viewer.add_image(nuclei_3d[0], name="stack", scale=(2.0, 1.0, 1.0))
    first = attach(viewer, volume, model=str(tiny_checkpoint), cache=False)
    plane = viewer.add_image(nuclei_2d[0][:128, :128], name="plane")
    second = attach(viewer, plane, model=str(tiny_checkpoint), cache=False)
    assert second.points_layer.ndim == 2 and second.preview_layer.ndim == 2
    assert first.points_layer not in viewer.layers
    second.points_layer.add(np.array([[60, 60]]))
    second.show_preview(second.compute_preview())
    np.testing.assert_allclose(second.preview_layer.scale, plane.scale)


def test_a_stray_click_beside_the_image_does_not_block_the_slice(viewer_3d, tiny_checkpoint):  # noqa: F811
    viewer, layer = viewer_3d
    session = attach(viewer, layer, model=str(tiny_checkpoint), cache=False)
    viewer.dims.set_current_step(0, 40)
    session.points_layer.add(np.array([[40, 50, 60], [40, 50, 130]]))  # the second lies beside the 100-pixel plane
    (prompt,) = session.prompts()
    np.testing.assert_allclose(prompt.points, [[60, 50]])
    session.commit()
    assert (session.labels_layer.data[40] == 1).any()


def test_choosing_another_image_says_start_is_needed(widget, viewer_3d, nuclei_2d):  # noqa: F811
    viewer, layer = viewer_3d
    other = viewer.add_image(nuclei_2d[0][:64, :64], name="other")
    widget.image.value = other
    assert widget.status.value == "press Start to segment other: clicks still go to nuclei"
    assert widget.session.image_layer is layer


def test_closing_the_dock_widget_stops_its_work_and_frees_its_keys(widget, viewer_3d, qtbot):  # noqa: F811
    from napari.utils.key_bindings import coerce_keybinding

    viewer, _ = viewer_3d
    bound = {str(coerce_keybinding(k)) for k in viewer.keymap}
    assert str(coerce_keybinding("Shift-C")) in bound
    widget.run_embedding(current=False)  # long work: every slice
    viewer.window.remove_dock_widget(widget.native)  # napari's close button
    qtbot.waitUntil(lambda: not widget.workers.busy, timeout=60000)
    assert widget.workers.closed
    assert str(coerce_keybinding("Shift-C")) not in {str(coerce_keybinding(k)) for k in viewer.keymap}
