"""Segment everything in the dock widget: the modes a model offers, AIS on a slice and
over the whole volume (linked through z), cancel, and existing labels kept. The tiny SAM
gets a random instance decoder by hand; what is checked is where objects go."""

import numpy as np
import pytest

from napari_sam.auto import AISSettings, iter_instance_maps, link_planes, segment_ais
from tests.conftest import drain
from tests.test_api_everything import random_decoder

pytestmark = pytest.mark.viewer


@pytest.fixture(scope="module")
def stack(nuclei_3d):
    return np.ascontiguousarray(nuclei_3d[0][40:45, :64, :80])


@pytest.fixture(scope="module")
def ais_advice(stack, tiny_checkpoint):
    """AIS thresholds at the medians of the random decoder's maps of slice 2 (it then finds
    many objects), as a checkpoint's advice would carry them."""
    from napari_sam.core.embeddings import Embeddings
    from napari_sam.core.models import load_model

    emb = Embeddings(stack, load_model(tiny_checkpoint, device="cpu", dtype="float32"), cache=False, axes="ZYX")
    _, maps = drain(iter_instance_maps(emb, 2, random_decoder()))
    fg, centre, boundary = (float(np.median(m)) for m in maps)
    return {"foreground_threshold": fg, "center_distance_threshold": centre, "boundary_distance_threshold": boundary}


def _widget(make_napari_viewer, stack, tiny_checkpoint, monkeypatch, qtbot, advice=None):
    """The widget on the stack; with ``advice`` (a checkpoint's "automatic" metadata) the
    model it loads has an instance decoder."""
    import napari_sam.core.sam2_models as models  # where the annotator's model is resolved
    from napari_sam._qt.widget import SamWidget

    monkeypatch.setenv("NAPARI_SAM_MODEL", str(tiny_checkpoint))
    if advice is not None:
        load = models.resolve_model

        def with_decoder(*args, **kwargs):
            model = load(*args, **kwargs)
            model.instance_decoder = random_decoder()
            model.metadata["automatic"] = advice
            return model

        monkeypatch.setattr(models, "resolve_model", with_decoder)
    viewer = make_napari_viewer()
    viewer.add_image(stack, name="nuclei", scale=(0.284, 0.127, 0.127))
    w = SamWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.start_session()
    qtbot.waitUntil(lambda: w.session is not None, timeout=60000)
    return viewer, w


def _idle(w, qtbot):
    qtbot.waitUntil(lambda: not w.workers.busy and not w._preview_running, timeout=120000)


def _modes(w):
    return [c for c in w.everything_mode.choices]


def test_decoder_modes_are_offered_only_with_a_decoder_and_the_advice_is_preselected(
        make_napari_viewer, stack, tiny_checkpoint, monkeypatch, qtbot):
    _, plain = _widget(make_napari_viewer, stack, tiny_checkpoint, monkeypatch, qtbot)
    assert _modes(plain) == ["auto", "boxes", "labels"] and plain.everything_mode.value == "auto"
    assert not plain.whole_volume.native.isHidden() and not plain.whole_volume.value  # the window is not shown
    assert plain.everything.text == "Segment everything on this slice"
    plain.whole_volume.value = True
    assert plain.everything.text == "Segment everything in this volume"
    _idle(plain, qtbot)
    _, decoded = _widget(make_napari_viewer, stack, tiny_checkpoint, monkeypatch, qtbot, advice={"mode": "apg"})
    assert _modes(decoded) == ["ais", "apg", "auto", "boxes", "labels"]
    assert decoded.everything_mode.value == "apg"
    names = [decoded.everything_mode.native.itemText(i) for i in range(decoded.everything_mode.native.count())]
    assert names[:2] == ["instance decoder (AIS)", "decoder prompts (APG)"]
    _idle(decoded, qtbot)


def test_ais_on_a_slice_keeps_existing_labels(make_napari_viewer, stack, tiny_checkpoint, monkeypatch, qtbot,
                                              ais_advice):
    viewer, w = _widget(make_napari_viewer, stack, tiny_checkpoint, monkeypatch, qtbot, advice={"ais": ais_advice})
    assert w.everything_mode.value == "ais"  # a decoder and no mode named: AIS, as micro-sam recommends
    session = w.session
    viewer.dims.set_current_step(0, 2)
    data = session.labels_layer.data
    data[2, :10, :10] = 9
    # the user's own layer (ground truth, say) is not AIS's input
    mine = viewer.add_labels(np.zeros(stack.shape, np.uint8), name="my labels", scale=(0.284, 0.127, 0.127))
    w.rough.reset_choices()
    assert w.rough.value is mine
    worker = w.run_everything()
    assert w.workers.running(worker)  # the work runs in a thread, the viewer keeps drawing
    _idle(w, qtbot)
    decoder = session.annotator.model.instance_decoder
    expected = segment_ais(session.annotator.embeddings, 2, decoder, AISSettings(**ais_advice))
    assert expected.max() > 3
    assert (data[2, :10, :10] == 9).all()
    new = (data[2] > 0) & (data[2] != 9)
    existing = np.zeros(new.shape, bool)
    existing[:10, :10] = True
    np.testing.assert_array_equal(new, (expected > 0) & ~existing)
    n = len(np.unique(data[2][new]))
    assert w.status.value == f"committed {n} object(s)" and n >= 3
    assert not data[1].any() and not data[3].any() and not mine.data.any()


def test_augment_is_offered_for_ais_and_commits_the_augmented_objects(make_napari_viewer, stack, tiny_checkpoint,
                                                                     monkeypatch, qtbot, ais_advice):
    viewer, w = _widget(make_napari_viewer, stack, tiny_checkpoint, monkeypatch, qtbot,
                        advice={"mode": "apg", "ais": ais_advice})
    assert w.augment.native.isHidden() and not w.augment.value  # APG preselected: nothing to augment
    w.everything_mode.value = "ais"
    assert not w.augment.native.isHidden()
    w.augment.value = True
    viewer.dims.set_current_step(0, 2)
    w.run_everything()
    _idle(w, qtbot)
    emb, decoder = w.session.annotator.embeddings, w.session.annotator.model.instance_decoder
    expected = segment_ais(emb, 2, decoder, AISSettings(**ais_advice), augment=True)
    plain = segment_ais(emb, 2, decoder, AISSettings(**ais_advice))
    assert expected.max() >= 3 and not np.array_equal(expected > 0, plain > 0)
    np.testing.assert_array_equal(w.session.labels_layer.data[2] > 0, expected > 0)
    w.everything_mode.value = "auto"
    assert w.augment.native.isHidden()


def test_whole_volume_is_cancelled_then_run_and_linked_through_z(make_napari_viewer, stack, tiny_checkpoint,
                                                                 monkeypatch, qtbot, ais_advice):
    _, w = _widget(make_napari_viewer, stack, tiny_checkpoint, monkeypatch, qtbot, advice={"ais": ais_advice})
    session = w.session
    annotator = session.annotator
    w.whole_volume.value = True
    # Cancel at the first report: the planes after it are never done and nothing is written.
    worker = w.run_everything()
    assert w.cancel.enabled
    worker.yielded.connect(lambda *_: w.cancel.clicked())
    _idle(w, qtbot)
    assert "cancelled: nothing was committed" in w.status.value
    assert not session.labels_layer.data.any() and not annotator.is_embedded(4)
    # the whole run: one id per 3D object
    w.run_everything()
    _idle(w, qtbot)
    data = session.labels_layer.data
    decoder = annotator.model.instance_decoder
    expected = link_planes([segment_ais(annotator.embeddings, z, decoder, AISSettings(**ais_advice))
                            for z in range(5)])
    np.testing.assert_array_equal(data, expected)
    assert any((expected == i).any(axis=(1, 2)).sum() > 1 for i in range(1, int(expected.max()) + 1))
    assert w.status.value == f"committed {int(expected.max())} object(s) on 5 slice(s)"
    w.undo_commit()
    assert not data.any()
