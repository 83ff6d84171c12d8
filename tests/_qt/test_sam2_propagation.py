"""Propagation with SAM 2's memory in the viewer, end to end: the dock widget's "propagate
with" choice, a real GoNuclear stack (six planes of the visible volume), a nucleus committed
on one plane, and the small randomised SAM 2.1 of tests/reference/sam2/sam2_small_seed0 as
the tracker. Its weights are random, so the quality of the masks means nothing: these tests
check where labels are written (the other planes get the object's id, nothing else is
overwritten), one undo step, cancel, corrections, the feature cache, the download question
and the one-line errors; never where the masks lie."""

import json
from pathlib import Path

import numpy as np
import pytest

from napari_sam.core.masks import PlaneMask

pytestmark = pytest.mark.viewer

REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "sam2" / "sam2_small_seed0"
PLANES = slice(41, 47)  # six planes of the GoNuclear volume around the nuclei used below
SEED, OTHER = 28, 33  # GoNuclear ids: the nucleus propagated, and one that must stay as it is


@pytest.fixture(scope="module")
def sam2():
    """The reference set's randomised SAM 2.1, loaded as a user's checkpoint is (its
    configuration given: it is no released size)."""
    from napari_sam.core.sam2_models import load_sam2_model
    from napari_sam.model.sam2 import config_from_official

    config = config_from_official(json.loads((REFERENCE / "config.json").read_text()), name=REFERENCE.name)
    return load_sam2_model(REFERENCE / "weights.pth", device="cpu", config=config)


@pytest.fixture(scope="module")
def crop(nuclei_3d):
    image, labels = nuclei_3d
    return np.ascontiguousarray(image[PLANES]), np.ascontiguousarray(labels[PLANES])


@pytest.fixture()
def widget(make_napari_viewer, crop, tiny_checkpoint, monkeypatch, qtbot):
    monkeypatch.setenv("NAPARI_SAM_MODEL", str(tiny_checkpoint))
    from napari_sam._qt.widget import SamWidget

    viewer = make_napari_viewer()
    viewer.add_image(crop[0], name="nuclei", scale=(0.284, 0.127, 0.127))
    w = SamWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.start_session()
    qtbot.waitUntil(lambda: w.session is not None, timeout=60000)
    yield w
    _idle(w, qtbot)


def _idle(w, qtbot):
    qtbot.waitUntil(lambda: not w.workers.busy and not w._preview_running, timeout=180000)


def _planes_of(labels, label_id) -> list[int]:
    return np.flatnonzero((labels == label_id).any(axis=(1, 2))).tolist()


def _seed(w, gt, obj=SEED, plane=3):
    """Commit a ground-truth nucleus on one plane, as a click and Shift-C would."""
    return w.session.commit_masks((plane,), [PlaneMask.from_full(gt[plane] == obj)]).ids[0]


def _check_only_the_object_was_added(before, after, label_id):
    changed = before != after
    assert changed.any()
    assert (after[changed] == label_id).all()  # only the object's id was written...
    assert (before[changed] == 0).all()  # ...and only where nothing was


def test_sam2_propagates_through_the_stack_undoes_in_one_step_and_reuses_its_features(widget, crop, sam2, qtbot):
    gt = crop[1]
    session = widget.session
    labels = session.labels_layer.data
    assert _seed(widget, gt) == 1
    for z in range(6):  # another nucleus on every plane: it must stay as it is
        session.annotator.writer.commit((z,), [PlaneMask.from_full((gt[z] == OTHER) & (labels[z] == 0))], ids=[2])
    before = labels.copy()
    widget.tracking.choose(sam2)
    assert widget.tracking.tracker.value is sam2 and widget.tracking.spec() is sam2
    assert widget.status.value == "propagation with sam2_small_seed0's memory"
    widget.viewer.dims.set_current_step(0, 3)
    session.labels_layer.selected_label = 1

    widget.run_propagation()
    assert not widget.propagate.enabled and not widget.tracking.tracker.enabled  # one propagation at a time
    _idle(widget, qtbot)
    assert widget.propagate.enabled and widget.tracking.all.enabled
    written = [z for z in _planes_of(labels, 1) if z != 3]
    assert written, widget.status.value
    assert widget.status.value == f"propagated object 1 with sam2_small_seed0 to {len(written)} slice(s), as one " \
                                  "undo step"
    assert min(written) < 3 < max(written)  # both ways from the current plane
    _check_only_the_object_was_added(before, labels, 1)
    np.testing.assert_array_equal(labels[3], before[3])  # the prompted plane is the user's
    assert session.annotator.tracking.model is sam2
    features = session.annotator.tracking.features
    assert features.computed == 6  # each plane through the encoder once, both directions together
    first = labels.copy()

    widget.undo.clicked()  # the whole propagation is one step
    np.testing.assert_array_equal(labels, before)
    assert widget.status.value == f"undid object(s) [1] on {len(written)} plane(s)"

    widget.run_propagation()
    _idle(widget, qtbot)
    np.testing.assert_array_equal(labels, first)  # the same answer...
    assert session.annotator.tracking.features is features and features.computed == 6  # ...from the cache

    # a correction: the user redraws the object on plane 1 and propagates from there
    labels[1][labels[1] == 1] = 0
    labels[1][(gt[1] == SEED) & (labels[1] == 0)] = 1
    corrected = labels.copy()
    widget.viewer.dims.set_current_step(0, 1)
    widget.run_propagation()
    _idle(widget, qtbot)
    assert widget.status.value.startswith("propagated object 1 with sam2_small_seed0 to 2 slice(s)")  # 0 and 2
    # plane 1 now owns planes 0 to 2 (half way to plane 3); plane 3 keeps the rest
    for z in (1, 3, 4, 5):
        np.testing.assert_array_equal(labels[z], corrected[z])
    assert (labels == 2).sum() == (before == 2).sum() and ((labels == 2) == (before == 2)).all()
    assert features.computed == 6
    widget.undo.clicked()
    np.testing.assert_array_equal(labels, corrected)


def test_propagate_all_labels_carries_every_object_in_one_undo_step(widget, crop, sam2, qtbot):
    gt = crop[1]
    session = widget.session
    labels = session.labels_layer.data
    assert _seed(widget, gt, SEED, 3) == 1 and _seed(widget, gt, 14, 2) == 2
    before = labels.copy()
    widget.tracking.choose(sam2)
    widget.tracking.all.clicked()
    _idle(widget, qtbot)
    assert widget.status.value.startswith("propagated all objects with sam2_small_seed0 to "), widget.status.value
    assert set(_planes_of(labels, 1)) - {3} and set(_planes_of(labels, 2)) - {2}
    changed = before != labels
    assert set(np.unique(labels[changed])) <= {1, 2} and (before[changed] == 0).all()
    widget.undo.clicked()
    np.testing.assert_array_equal(labels, before)


def test_cancel_keeps_the_planes_written_as_one_undo_step(widget, crop, sam2, qtbot):
    gt = crop[1]
    session = widget.session
    labels = session.labels_layer.data
    _seed(widget, gt)
    before = labels.copy()
    widget.tracking.choose(sam2)
    widget.viewer.dims.set_current_step(0, 3)
    session.labels_layer.selected_label = 1
    worker = widget.run_propagation()
    worker.yielded.connect(lambda *_: widget.cancel.clicked())  # after the first plane
    _idle(widget, qtbot)
    assert "cancelled" in widget.status.value and widget.propagate.enabled
    written = [z for z in _planes_of(labels, 1) if z != 3]
    assert 1 <= len(written) < 5  # forward first: plane 4, perhaps 5 before the cancel was seen
    _check_only_the_object_was_added(before, labels, 1)
    cancelled = labels.copy()
    # the cancelled propagation's undo step is closed: a later commit is a step of its own
    assert _seed(widget, gt, 14, 0) == 2
    widget.undo.clicked()
    np.testing.assert_array_equal(labels, cancelled)
    widget.undo.clicked()
    np.testing.assert_array_equal(labels, before)


def test_the_menu_asks_before_downloading_and_reports_bad_checkpoints_in_one_line(widget, crop, tiny_checkpoint,
                                                                                     monkeypatch, qtbot):
    from napari_sam import weights
    from napari_sam._qt.tracking import SAM, SAM2_FILE

    controls = widget.tracking
    assert controls.tracker.value == SAM and controls.spec() is None and controls.checkpoint.native.isHidden()
    assert list(controls.tracker.choices) == [SAM, "sam2.1_hiera_tiny", "sam2.1_hiera_small",
                                              "sam2.1_hiera_base_plus", "sam2.1_hiera_large", SAM2_FILE]
    session = widget.session
    labels = session.labels_layer.data
    _seed(widget, crop[1])
    before = labels.copy()
    widget.viewer.dims.set_current_step(0, 3)
    session.labels_layer.selected_label = 0
    assert widget.run_propagation() is None and "0 is the background" in widget.status.value
    session.labels_layer.selected_label = 1

    fetched, asked = [], []
    monkeypatch.setattr(weights, "fetch_checkpoint", lambda name, *a, **k: fetched.append(name) or REFERENCE /
                        "weights.pth")
    controls.confirm = lambda question: asked.append(question) or False
    controls.choose("sam2.1_hiera_tiny")
    assert "not downloaded yet" in widget.status.value and "156 MB" in widget.status.value
    assert widget.run_propagation() is None  # the user said no: nothing fetched, nothing run
    assert fetched == [] and len(asked) == 1 and "Download sam2.1_hiera_tiny (156 MB)" in asked[0]
    assert widget.status.value.startswith("sam2.1_hiera_tiny was not downloaded")

    controls.confirm = lambda question: True  # yes: fetched (here: a file that is no SAM 2.1 tiny)
    shown = []
    say = controls._say  # the status lines, as the controls show them
    monkeypatch.setattr(controls, "_say", lambda text: shown.append(text) or say(text))
    with qtbot.capture_exceptions() as raised:  # napari also shows a worker's error in a notification
        widget.run_propagation()
        _idle(widget, qtbot)
    assert fetched == ["sam2.1_hiera_tiny"]
    assert shown[0] == "downloading (156 MB) and loading sam2.1_hiera_tiny..."
    assert raised == []  # said once, in the status line, not raised again into a notification
    assert widget.status.value.startswith("error: ") and "\n" not in widget.status.value
    assert "fits none of the SAM 2.1 sizes" in widget.status.value
    assert controls.tracker.enabled and widget.propagate.enabled
    np.testing.assert_array_equal(labels, before)

    controls.tracker.value = SAM2_FILE
    assert not controls.checkpoint.native.isHidden()  # shown with the choice (the window itself is not)
    controls.checkpoint.value = ""
    assert widget.run_propagation() is None and widget.status.value == "choose a SAM 2.1 checkpoint file"
    controls.choose(tiny_checkpoint)  # a SAM (1) checkpoint is no SAM 2
    assert controls.tracker.value == SAM2_FILE and controls.spec() == str(tiny_checkpoint)
    with qtbot.capture_exceptions() as raised:
        widget.run_propagation()
        _idle(widget, qtbot)
    assert raised == [] and widget.status.value.startswith("error: ")
    assert "is a SAM (1) checkpoint" in widget.status.value and "\n" not in widget.status.value
    np.testing.assert_array_equal(labels, before)

    controls.choose("sam")  # back to SAM re-prompting: nothing of SAM 2 is used
    assert controls.tracker.value == SAM and widget.status.value == "propagation re-prompts SAM slice by slice"
    widget.run_propagation()
    _idle(widget, qtbot)
    assert session.annotator.tracking is None and session.tracker.choice is None
