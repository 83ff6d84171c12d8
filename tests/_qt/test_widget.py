"""The dock widget and the viewer session, driven as a user would: real nuclei images,
points and boxes placed through the layer APIs, buttons clicked, Labels data checked."""

import numpy as np
import pytest
import zarr

from napari_sam.layers import KEYS, attach

pytestmark = pytest.mark.viewer


@pytest.fixture()
def viewer_3d(make_napari_viewer, nuclei_3d):
    viewer = make_napari_viewer()
    layer = viewer.add_image(nuclei_3d[0], name="nuclei", scale=(0.284, 0.127, 0.127))
    return viewer, layer


@pytest.fixture()
def widget(viewer_3d, tiny_checkpoint, monkeypatch, qtbot):
    monkeypatch.setenv("NAPARI_SAM_MODEL", str(tiny_checkpoint))
    from napari_sam._qt.widget import SamWidget

    viewer, layer = viewer_3d
    w = SamWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert w.model.value == str(tiny_checkpoint) and w.image.value is layer
    w.start_session()
    qtbot.waitUntil(lambda: w.session is not None, timeout=30000)
    yield w
    _idle(w, qtbot)  # no worker may outlive the test (and the interpreter)


def _idle(w, qtbot):
    qtbot.waitUntil(lambda: not w.workers.busy and not w._preview_running, timeout=60000)


def test_session_prompts_follow_planes_scale_and_commit_only_their_plane(viewer_3d, tiny_checkpoint):
    viewer, layer = viewer_3d
    session = attach(viewer, layer, model=str(tiny_checkpoint), cache=False)
    assert session.labels_layer.data.shape == (100, 100, 100)
    np.testing.assert_allclose(session.points_layer.scale, layer.scale)
    viewer.dims.set_current_step(0, 40)
    assert session.current_plane() == (40,)
    session.points_layer.add(np.array([[40, 50, 60], [40, 20, 25]]))
    session.points_layer.features.loc[1, "positive"] = False
    session.points_layer.add(np.array([[41, 10, 10]]))  # another plane
    (prompt,) = session.prompts()
    np.testing.assert_allclose(prompt.points, [[60, 50], [25, 20]])  # (x, y)
    np.testing.assert_array_equal(prompt.labels, [1, 0])
    assert prompt.box is None
    expected = session.annotator.segment((40,), points=[[60, 50], [25, 20]], labels=[1, 0])
    session.show_preview(session.compute_preview())
    assert session.preview_is_current()
    session.commit()
    labels = session.labels_layer.data
    assert set(np.unique(labels[40])) == {0, 1} and (labels[40] == 1).sum() == expected.area
    assert not labels[:40].any() and not labels[41:].any()
    assert len(session.points_layer.data) == 1  # the other plane's point stays
    assert [c.ids for c in session.undo()] == [(1,)] and not labels.any()


def test_an_added_point_refines_the_shown_preview_and_other_edits_start_afresh(viewer_3d, tiny_checkpoint):
    viewer, layer = viewer_3d
    session = attach(viewer, layer, model=str(tiny_checkpoint), cache=False)
    viewer.dims.set_current_step(0, 40)
    asked = []
    segment = session.annotator.segment
    session.annotator.segment = lambda plane, prompt: asked.append(prompt.previous) or segment(plane, prompt)

    def preview():
        session.show_preview(session.compute_preview())
        return session.preview_masks

    session.points_layer.add(np.array([[40, 50, 60]]))
    first = preview()
    assert asked[-1] is None and first[0].logits is not None
    session.points_layer.add(np.array([[40, 30, 30]]))
    second = preview()
    assert asked[-1] is first[0]  # SAM's loop: the last answer guides the next
    expected = segment((40,), points=[[60, 50], [30, 30]], labels=[1, 1], previous=first[0])
    np.testing.assert_array_equal(second[0].mask, expected.mask)
    moved = np.array(session.points_layer.data, copy=True)
    moved[0] += [0, 5, 5]
    session.points_layer.data = np.vstack([moved, [[40, 20, 20]]])  # one point moved, one added
    preview()
    assert asked[-1] is None
    # a point added to a box refines the box's answer
    session.clear_prompts()
    session.boxes_layer.add(np.array([[40, 30, 40], [40, 30, 80], [40, 70, 80], [40, 70, 40]]), shape_type="rectangle")
    boxed = preview()
    session.points_layer.add(np.array([[40, 50, 60]]))
    preview()
    assert asked[-1] is boxed[0]
    viewer.dims.set_current_step(0, 41)
    session.points_layer.add(np.array([[41, 50, 60], [41, 52, 62]]))
    preview()
    assert asked[-1] is None  # another plane


def test_boxes_become_several_objects_in_one_commit(viewer_3d, tiny_checkpoint):
    viewer, layer = viewer_3d
    session = attach(viewer, layer, model=str(tiny_checkpoint), cache=False)
    viewer.dims.set_current_step(0, 60)
    boxes = [[[60, 10, 10], [60, 10, 40], [60, 35, 40], [60, 35, 10]],
             [[60, 60, 55], [60, 60, 90], [60, 90, 90], [60, 90, 55]]]
    session.boxes_layer.add_rectangles(np.array(boxes, dtype=float))
    prompts = session.prompts()
    np.testing.assert_allclose(np.array([p.box for p in prompts]), [[10, 10, 40, 35], [55, 60, 90, 90]])
    assert all(len(p.points) == 0 for p in prompts)
    session.commit()
    ids = set(np.unique(session.labels_layer.data[60])) - {0}
    assert ids <= {1, 2} and len(ids) >= 1 and not session.labels_layer.data[59].any()
    assert len(session.boxes_layer.data) == 0


def test_existing_labels_are_protected_unless_overwrite(viewer_3d, tiny_checkpoint):
    viewer, layer = viewer_3d
    existing = viewer.add_labels(np.zeros((100, 100, 100), np.uint16), name="mine", scale=layer.scale)
    existing.data[30] = 5  # the whole plane is taken
    said = []
    session = attach(viewer, layer, model=str(tiny_checkpoint), labels=existing, cache=False, say=said.append)
    assert session.labels_layer is existing and session.annotator.writer.next_id() == 6
    viewer.dims.set_current_step(0, 30)
    session.points_layer.add(np.array([[30, 50, 50]]))
    session.commit()
    assert (existing.data[30] == 5).all()
    assert said[-1] == ("nothing committed; 1 object(s) found no free pixel "
                        "(tick 'overwrite existing labels' to replace)")
    session.set_overwrite(True)
    session.points_layer.add(np.array([[30, 50, 50]]))
    session.commit()
    assert (existing.data[30] == 6).any()
    assert said[-1] == "committed object(s) [6] (Shift-U undoes)"


def test_bad_inputs_are_refused_clearly(make_napari_viewer, viewer_3d, tiny_checkpoint):
    viewer, layer = viewer_3d
    wrong = viewer.add_labels(np.zeros((10, 100, 100), np.uint8), scale=layer.scale)
    with pytest.raises(ValueError, match=r"labels have shape \(10, 100, 100\), but the image needs \(100, 100, 100\)"):
        attach(viewer, layer, model=str(tiny_checkpoint), labels=wrong, cache=False)
    with pytest.raises(ValueError, match="no image layer"):
        attach(make_napari_viewer(), model=str(tiny_checkpoint))
    session = attach(viewer, layer, model=str(tiny_checkpoint), cache=False)
    session.points_layer.add(np.array([[0, 150, 20]]))  # beside the image: a stray click prompts nothing
    assert session.prompts((0,)) == [] and session.compute_preview((0,))[2] == []
    with pytest.raises(ValueError, match="outside the 100x100 image"):  # through the API it is refused
        session.annotator.segment((0,), points=[[20, 150]])


def test_zarr_labels_on_disk(viewer_3d, tiny_checkpoint, tmp_path):
    viewer, layer = viewer_3d
    path = tmp_path / "labels.zarr"
    session = attach(viewer, layer, model=str(tiny_checkpoint), labels=path, cache=False)
    assert isinstance(session.labels_layer.data, zarr.Array)
    viewer.dims.set_current_step(0, 12)
    session.points_layer.add(np.array([[12, 40, 40]]))
    session.commit()
    on_disk = zarr.open_array(str(path), mode="r")
    assert np.asarray(on_disk[12]).max() == 1 and not np.asarray(on_disk[13]).any()
    assert sorted(p.parent.parent.name for p in (path / "c").rglob("*") if p.is_file()) == ["12"]


def test_widget_previews_commits_and_undoes(widget, viewer_3d, qtbot):
    viewer, _ = viewer_3d
    session = widget.session
    viewer.dims.set_current_step(0, 50)
    session.points_layer.add(np.array([[50, 40, 60]]))
    qtbot.waitUntil(lambda: session.preview_is_current() and not widget._preview_running, timeout=60000)
    assert session.preview_layer.data.ndim == 3 and session.preview_layer.data.any()
    assert "preview: 1 object(s)" in widget.status.value
    widget.commit.clicked()
    qtbot.waitUntil(lambda: session.labels_layer.data[50].any(), timeout=60000)
    _idle(widget, qtbot)
    assert set(np.unique(session.labels_layer.data)) == {0, 1} and not session.labels_layer.data[49].any()
    # the status line says what the commit did, not "committing..." for ever
    assert widget.status.value == "committed object(s) [1] (Shift-U undoes)"
    widget.commit.clicked()  # the prompts went with the commit
    _idle(widget, qtbot)
    assert widget.status.value == "nothing to commit: add points or boxes"
    widget.undo.clicked()
    assert not session.labels_layer.data.any() and "undid object(s) [1] on 1 plane(s)" in widget.status.value


def test_one_click_computes_one_preview_from_prompts_read_on_the_gui_thread(widget, viewer_3d, qtbot):
    viewer, _ = viewer_3d
    session = widget.session
    viewer.dims.set_current_step(0, 30)
    widget.run_embedding(current=True)
    _idle(widget, qtbot)
    calls = []
    compute = session.compute_preview
    session.compute_preview = lambda plane=None, prompts=None: calls.append((plane, prompts)) or compute(plane, prompts)
    session.points_layer.add(np.array([[30, 40, 60]]))
    qtbot.waitUntil(lambda: session.preview_is_current() and not widget._preview_running, timeout=60000)
    _idle(widget, qtbot)
    # napari sends "adding" then "added": only the second describes the new prompts
    assert len(calls) == 1
    plane, prompts = calls[0]
    assert plane == (30,) and len(prompts) == 1
    assert prompts[0].points.shape == (1, 2) and prompts[0].labels.tolist() == [1]
    assert session.preview_layer.data.any()


def test_widget_toggles_background_and_binds_keys(widget):
    session = widget.session
    assert session.toggle_mode() is False
    session.points_layer.add(np.array([[0, 10, 10]]))
    assert not session.points_layer.features["positive"].iloc[-1]
    np.testing.assert_allclose(session.points_layer.face_color[-1], [1, 0, 0, 1])  # background: red
    assert session.toggle_mode() is True
    session.points_layer.add(np.array([[0, 12, 12]]))
    np.testing.assert_allclose(session.points_layer.face_color[-1], [0, 1, 0, 1])  # foreground: lime
    bound = {str(k).replace("+", "-").lower() for k in widget.viewer.keymap}
    assert {k.lower() for k in KEYS.values()} <= bound


def test_embedding_all_slices_can_be_cancelled_and_resumed(widget, qtbot):
    store = widget.session.annotator.embeddings.store
    worker = widget.run_embedding(current=False)
    qtbot.waitUntil(lambda: store.present().sum() >= 2, timeout=60000)
    widget.cancel.clicked()
    qtbot.waitUntil(lambda: not widget.workers.running(worker), timeout=60000)
    done = int(store.present().sum())
    assert 2 <= done < 100 and "cancelled" in widget.status.value


def test_points_on_a_slice_still_embedding_wait_for_it(widget, viewer_3d, qtbot):
    viewer, _ = viewer_3d
    session = widget.session
    viewer.dims.set_current_step(0, 70)
    widget.run_embedding(current=True)
    session.points_layer.add(np.array([[70, 30, 30]]))  # while that slice is computing
    qtbot.waitUntil(lambda: session.preview_is_current() and not widget.workers.busy, timeout=60000)
    assert session.annotator.is_embedded((70,)) and session.preview_masks


def test_closing_the_viewer_during_a_computation(make_napari_viewer, nuclei_3d, tiny_checkpoint, monkeypatch, qtbot):
    monkeypatch.setenv("NAPARI_SAM_MODEL", str(tiny_checkpoint))
    from napari_sam._qt.widget import SamWidget

    viewer = make_napari_viewer()
    viewer.add_image(nuclei_3d[0], name="nuclei")
    w = SamWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.start_session()
    qtbot.waitUntil(lambda: w.session is not None, timeout=30000)
    worker = w.run_embedding(current=False)
    qtbot.waitUntil(lambda: w.session.annotator.embeddings.store.present().sum() >= 1, timeout=60000)
    viewer.close()
    qtbot.waitUntil(lambda: worker.abort_requested or not worker.is_running, timeout=30000)


def test_widget_propagates_the_selected_label_and_undoes_it(widget, viewer_3d, nuclei_3d, monkeypatch, qtbot):
    from tests.core.test_propagation import ExactEmbeddings, _start

    gt = nuclei_3d[1]
    session = widget.session
    monkeypatch.setattr(session.annotator.embeddings, "segment", ExactEmbeddings(gt).segment)
    obj = np.unique(gt)[6]
    z, zs, start = _start(gt, obj)
    session.annotator.commit(z, [start])
    viewer, _ = viewer_3d
    viewer.dims.set_current_step(0, z)
    session.labels_layer.selected_label = 1
    widget.run_propagation()
    _idle(widget, qtbot)
    planes = np.flatnonzero((session.labels_layer.data == 1).any(axis=(1, 2)))
    assert len(planes) >= 5 and set(planes) <= set(zs)
    widget.undo.clicked()
    assert np.flatnonzero((session.labels_layer.data == 1).any(axis=(1, 2))).tolist() == [z]


def test_training_widget_fine_tunes_on_layers_and_hands_the_model_over(make_napari_viewer, nuclei_2d, tiny_checkpoint,
                                                                        monkeypatch, tmp_path, qtbot):
    import torch

    from napari_sam._qt.training import TrainingWidget
    from napari_sam._qt.widget import CHECKPOINT
    from napari_sam.core.models import load_model

    monkeypatch.setenv("NAPARI_SAM_MODEL", str(tiny_checkpoint))
    viewer = make_napari_viewer()
    image = viewer.add_image(np.stack([nuclei_2d[0][:128, :128], nuclei_2d[0][128:256, :128]]), name="img")
    labels = viewer.add_labels(np.stack([nuclei_2d[1][:128, :128], np.zeros((128, 128), nuclei_2d[1].dtype)]),
                               name="gt")
    w = TrainingWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.image.value, w.labels.value = image, labels
    w.base.value = str(tiny_checkpoint)
    w.steps.value = 3
    w.out.value = str(tmp_path / "tuned.pth")
    # the run's finer settings wait behind "more settings", at TrainingConfig's defaults
    assert all(s.native.isHidden() for s in w.settings.values())
    assert (w.settings["box_noise"].value, w.settings["central_click_probability"].value) == (0.02, 0.75)
    w.more.value = True
    assert not any(s.native.isHidden() for s in w.settings.values())
    chosen = {"learning_rate": 3e-4, "box_noise": 0.05, "central_click_probability": 0.5, "seed": 2}
    for name, value in chosen.items():
        w.settings[name].value = value
    worker = w.start()
    assert worker is not None
    qtbot.waitUntil(lambda: not worker.is_running and w.model is not None, timeout=120000)
    assert "saved" in w.status.value and w.curve.series["loss"] and len(w.curve.series["loss"]) == 3
    tuned, base = load_model(tmp_path / "tuned.pth"), load_model(tiny_checkpoint)
    dec = [k for k in base.state_dict() if k.startswith("mask_decoder.")]
    enc = [k for k in base.state_dict() if k.startswith("image_encoder.")]
    kept = tuned.metadata["training"]["weights_from_step"]
    assert tuned.metadata["training"]["steps"] == 3 and kept in (0, 1, 2, 3)
    settings = tuned.metadata["training"]["settings"]
    assert {name: settings[name] for name in chosen} == pytest.approx(chosen)
    assert any(not torch.equal(tuned.state_dict()[k], base.state_dict()[k]) for k in dec) == (kept > 0)
    assert all(torch.equal(tuned.state_dict()[k], base.state_dict()[k]) for k in enc)
    seg = w.use_model()
    qtbot.waitUntil(lambda: seg.session is not None, timeout=30000)
    assert seg.model.value == CHECKPOINT and seg.session.annotator.model.source.path == str(tmp_path / "tuned.pth")
    qtbot.waitUntil(lambda: not seg.workers.busy, timeout=30000)


def test_training_widget_refuses_labels_of_another_shape(make_napari_viewer, nuclei_2d):
    from napari_sam._qt.training import TrainingWidget

    viewer = make_napari_viewer()
    viewer.add_image(nuclei_2d[0], name="img")
    viewer.add_labels(np.zeros((10, 10), np.uint8), name="small")
    w = TrainingWidget(viewer)
    assert w.start() is None and "do not match" in w.status.value


def test_widget_segments_everything_on_a_slice_and_keeps_existing_labels(widget, viewer_3d, qtbot):
    viewer, _ = viewer_3d
    session = widget.session
    viewer.dims.set_current_step(0, 45)
    session.labels_layer.data[45, :10, :10] = 9
    widget.everything_mode.value = "boxes"
    widget.run_everything()
    _idle(widget, qtbot)
    data = session.labels_layer.data
    assert "committed" in widget.status.value
    assert (data[45, :10, :10] == 9).all() and len(np.unique(data[45])) > 2
    assert not data[44].any() and not data[46].any()


def test_widget_refines_the_objects_of_a_rough_labels_layer(widget, viewer_3d, nuclei_3d, qtbot, monkeypatch):
    from scipy import ndimage

    viewer, layer = viewer_3d
    session = widget.session
    image, truth = nuclei_3d
    viewer.dims.set_current_step(0, 45)
    wrong = viewer.add_labels(np.zeros((10, 10), np.int32), name="wrong shape")
    rough = np.zeros(truth.shape, np.int32)
    blobs = ndimage.binary_opening(image[45] > np.percentile(image[45], 80), iterations=2)
    rough[45] = ndimage.label(blobs)[0]  # a threshold's blobs
    viewer.add_labels(rough, name="threshold", scale=layer.scale)
    names = [c.name for c in widget.rough.choices]
    assert "threshold" in names and "SAM labels" not in names
    widget.everything_mode.value = "labels"
    assert not widget.rough.native.isHidden()  # shown with this mode (the window itself is not shown)
    widget.rough.value = wrong
    assert widget.run_everything() is None and "wrong shape has shape (10, 10)" in widget.status.value
    widget.rough.value = viewer.layers["threshold"]
    from napari_sam.auto import boxes as automatic

    asked = []
    boxes_through_sam = automatic.iter_from_boxes
    monkeypatch.setattr(automatic, "iter_from_boxes", lambda emb, plane, boxes, **k: asked.append((plane, boxes))
                        or boxes_through_sam(emb, plane, boxes, **k))
    widget.run_everything()
    _idle(widget, qtbot)
    # each blob of the threshold became one box prompt on this slice (the model is random
    # here, so its masks are not checked against the blobs)
    assert asked[0][0] == (45,)
    np.testing.assert_array_equal(asked[0][1], automatic.boxes_from_labels(rough[45])[0])
    data = session.labels_layer.data
    assert 0 < len(np.unique(data[45])) - 1 <= len(np.unique(rough[45])) - 1
    assert not data[44].any() and not data[46].any()


def test_the_default_model_is_selected_and_segments_a_real_nucleus(make_napari_viewer, nuclei_2d, monkeypatch, qtbot):
    # The main job: no model named anywhere, the shipped default model does the work.
    monkeypatch.delenv("NAPARI_SAM_MODEL", raising=False)
    from napari_sam._qt.widget import SamWidget
    from napari_sam.core.prompt_simulation import interior_point

    image, truth = nuclei_2d  # held out of the default model's training
    viewer = make_napari_viewer()
    viewer.add_image(image, name="nuclei")
    w = SamWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert w.model.value == "default"
    w.start_session()
    qtbot.waitUntil(lambda: w.session is not None, timeout=60000)
    session = w.session
    ious = []
    for k, i in enumerate(np.unique(truth)[[10, 50, 100]], start=1):
        x, y = interior_point(truth == i)
        session.points_layer.add(np.array([[y, x]]))
        qtbot.waitUntil(lambda: session.preview_is_current() and not w._preview_running, timeout=60000)
        w.commit.clicked()
        qtbot.waitUntil(lambda k=k: (session.labels_layer.data == k).any(), timeout=60000)
        _idle(w, qtbot)
        got = session.labels_layer.data == k
        ious.append((got & (truth == i)).sum() / (got | (truth == i)).sum())
    assert set(np.unique(session.labels_layer.data)) == {0, 1, 2, 3}
    assert np.mean(ious) > 0.6 and min(ious) > 0.3
    # Segment everything: what was measured to suit this model is preselected, keeps the
    # three objects above, and finds most nuclei of this image it never saw.
    from napari_sam.evaluate import instance_scores

    assert w.everything_mode.value == "ais"  # its shipped instance decoder
    clicked = np.array(session.labels_layer.data, copy=True)
    w.run_everything()
    _idle(w, qtbot)
    data = session.labels_layer.data
    assert (data[clicked > 0] == clicked[clicked > 0]).all()
    assert len(np.unique(data)) > 50 and "committed" in w.status.value
    assert instance_scores(truth, data)["ap50"] > 0.4  # 0.59 when written


def test_work_that_ends_re_enables_its_buttons_before_the_widget_counts_as_idle(qtbot):
    # A test (or a script) that waits for `busy` to turn False must find the buttons that
    # the end of the work re-enables already enabled: `ended` runs first, however it ends.
    from napari_sam._qt.workers import Workers

    workers = Workers(say=lambda text: None)
    seen = []

    def work():
        yield from ()
        return "done"

    for _ in range(3):
        workers.steps(work, desc="test", progress_of=lambda p: (0, 0), ended=lambda: seen.append(workers.busy))
        qtbot.waitUntil(lambda: not workers.busy, timeout=10000)
    assert seen == [True, True, True]


def test_a_runtime_error_in_stepped_work_is_said_and_ends_the_work(qtbot):
    # superqt's generator workers swallow a RuntimeError (every torch error is one) without
    # `errored` or `finished`: the widget then stayed busy for ever and said nothing
    from napari_sam._qt.workers import Workers

    said, ended = [], []
    workers = Workers(say=said.append)

    def work():
        yield from ()
        raise RuntimeError("CUDA out of memory")

    workers.steps(work, desc="test", progress_of=lambda p: (0, 0), ended=lambda: ended.append(True))
    qtbot.waitUntil(lambda: not workers.busy, timeout=10000)
    assert ended == [True] and said == ["error: CUDA out of memory"]
