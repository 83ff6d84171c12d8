"""Committing objects into label images: ids, protection of earlier work, undo, Zarr chunks."""

import numpy as np
import pytest
import zarr

from napari_sam.core.label_target import create_label_store
from napari_sam.core.labels import LabelWriter
from napari_sam.core.masks import PlaneMask


def _obj(y0, y1, x0, x1, mask=None):
    m = np.ones((y1 - y0, x1 - x0), bool) if mask is None else mask
    return PlaneMask((y0, y1, x0, x1), m, 0.9, ((0, 0),))


def test_commits_take_free_ids_and_only_their_plane():
    labels = np.zeros((4, 50, 60), np.uint16)
    labels[0, :5, :5] = 7  # earlier work on another plane
    writer = LabelWriter(labels)
    assert writer.next_id() == 8
    c = writer.commit((2,), [_obj(10, 20, 10, 30), _obj(30, 40, 5, 15)])
    assert c.ids == (8, 9) and c.pixels == (200, 100) and c.region == (10, 40, 5, 30)
    assert (labels[2, 10:20, 10:30] == 8).all() and (labels[2, 30:40, 5:15] == 9).all()
    assert (labels[[1, 3]] == 0).all() and (labels[0, :5, :5] == 7).all()
    assert writer.next_id() == 10


def test_existing_labels_are_kept_unless_overwrite():
    labels = np.zeros((30, 30), np.uint8)
    labels[0:10, 0:10] = 3
    writer = LabelWriter(labels)
    c = writer.commit((), [_obj(5, 15, 5, 15)])
    assert c.ids == (4,) and c.pixels == (100 - 25,) and (labels[5:10, 5:10] == 3).all()
    c2 = writer.commit((), [_obj(0, 4, 0, 4)])  # entirely over object 3: nothing to take
    assert c2.ids == (0,) and c2.pixels == (0,) and writer.next_id() == 5
    writer.commit((), [_obj(0, 4, 0, 4)], overwrite=True)
    assert (labels[0:4, 0:4] == 5).all()


def test_undo_restores_exactly_and_in_order():
    labels = np.zeros((2, 40, 40), np.uint32)
    labels[1, 20:30, 20:30] = 1
    original = labels.copy()
    writer = LabelWriter(labels)
    writer.commit((1,), [_obj(15, 25, 15, 25)], overwrite=True)
    after_first = labels.copy()
    writer.commit((0,), [_obj(0, 40, 0, 40)])
    assert writer.undo()[0].plane == (0,) and np.array_equal(labels, after_first)
    assert writer.undo()[0].plane == (1,) and np.array_equal(labels, original)
    assert writer.undo() == []


def test_a_group_of_commits_is_undone_at_once():
    labels = np.zeros((5, 20, 20), np.uint8)
    writer = LabelWriter(labels)
    writer.commit((0,), [_obj(0, 5, 0, 5)])
    with writer.one_step():
        for z in (1, 2, 3):
            writer.commit((z,), [_obj(2, 8, 2, 8)], ids=[2])
    assert len(writer.history) == 2
    undone = writer.undo()
    assert [c.plane for c in undone] == [(3,), (2,), (1,)] and not labels[1:].any() and labels[0].any()


def test_one_step_over_more_planes_than_the_undo_limit_is_undone_whole():
    """A propagation through 30 planes with 20 undo steps kept: one step, undone whole
    (it used to keep only the last 20 planes' commits and undo just one of them)."""
    labels = np.zeros((31, 12, 12), np.uint8)
    writer = LabelWriter(labels, max_undo=20)
    writer.commit((0,), [_obj(0, 5, 0, 5)])
    try:
        with writer.one_step():
            for z in range(1, 31):
                writer.commit((z,), [_obj(2, 8, 2, 8)], ids=[2])
            raise KeyboardInterrupt  # a cancel half way still leaves one step
    except KeyboardInterrupt:
        pass
    assert len(writer.history) == 2 and len(writer.history[-1]) == 30
    assert len(writer.undo()) == 30
    assert not labels[1:].any() and labels[0].any()


def test_bad_commits_are_refused_without_writing():
    labels = np.zeros((3, 20, 20), np.uint8)
    writer = LabelWriter(labels)
    with pytest.raises(ValueError, match="plane index of 1 value"):
        writer.commit((0, 1), [_obj(0, 5, 0, 5)])
    with pytest.raises(ValueError, match="does not fit the 20x20"):
        writer.commit((0,), [_obj(10, 25, 0, 5)])
    with pytest.raises(ValueError, match="nothing to commit"):
        writer.commit((0,), [_obj(0, 5, 0, 5, np.zeros((5, 5), bool))])
    labels[0, 0, 0] = 255
    with pytest.raises(ValueError, match="does not fit labels of dtype uint8"):
        writer.commit((1,), [_obj(0, 5, 0, 5)])
    assert labels.sum() == 255
    with pytest.raises(ValueError, match="integer dtype"):
        LabelWriter(np.zeros((4, 4), np.float32))


def test_zarr_labels_write_only_the_chunks_they_touch(tmp_path):
    path = tmp_path / "labels.zarr"
    store = create_label_store(path, (6, 2048, 2048), chunks=(256, 256))
    assert store.chunks == (1, 256, 256) and store.dtype == np.uint32
    writer = LabelWriter(store)
    writer.commit((3,), [_obj(300, 400, 600, 700)])
    chunk_files = sorted(p.relative_to(path / "c").as_posix() for p in (path / "c").rglob("*") if p.is_file())
    assert chunk_files == ["3/1/2"]  # one 256x256 chunk of one plane
    assert np.asarray(store[3, 300:400, 600:700]).min() == 1
    # reopened later: the next id comes from the attributes, without scanning
    again = LabelWriter(create_label_store(path, (6, 2048, 2048)))
    assert again.next_id() == 2
    with pytest.raises(ValueError, match="not \\(6, 100, 100\\)"):
        create_label_store(path, (6, 100, 100))
    (tmp_path / "notes.zarr").write_text("not zarr")
    with pytest.raises(ValueError, match="not a Zarr label array"):
        create_label_store(tmp_path / "notes.zarr", (2, 2))


def test_two_writers_on_one_zarr_store_never_give_one_id_twice(tmp_path):
    # two notebooks (or a notebook beside the viewer) on the same label store
    path = tmp_path / "labels.zarr"
    first = LabelWriter(create_label_store(path, (2, 64, 64)))
    second = LabelWriter(create_label_store(path, (2, 64, 64)))
    assert first.commit((0,), [_obj(0, 5, 0, 5)]).ids == (1,)
    assert second.commit((0,), [_obj(10, 15, 10, 15)]).ids == (2,)
    assert first.commit((1,), [_obj(20, 25, 20, 25), _obj(30, 35, 30, 35)]).ids == (3, 4)
    assert second.commit((1,), [_obj(40, 45, 40, 45)]).ids == (5,)
    stored = np.asarray(zarr.open_array(str(path)))
    assert sorted(np.unique(stored).tolist()) == [0, 1, 2, 3, 4, 5]
    assert zarr.open_array(str(path)).attrs["napari_sam_max_id"] == 5


def test_next_id_of_a_large_foreign_zarr_array_is_found_chunkwise(tmp_path):
    z = zarr.create_array(str(tmp_path / "l.zarr"), shape=(4, 300, 300), chunks=(1, 100, 100), dtype="uint16")
    z[2, 250, 250] = 41
    assert LabelWriter(z).next_id() == 42


def test_undo_takes_back_only_what_the_commit_wrote_and_nobody_changed_since():
    labels = np.zeros((40, 40), np.uint16)
    writer = LabelWriter(labels)
    writer.commit((), [_obj(5, 25, 5, 25)])  # object 1
    labels[10:15, 30:35] = 2  # another object painted by hand, outside the commit
    labels[20:30, 20:30] = 9  # a brush stroke over part of object 1 and the background around it
    labels[6:8, 6:8] = 0  # an eraser inside object 1
    writer.note_id(9)
    assert writer.next_id() == 10  # the hand-painted id is never given to a new object
    writer.undo()
    assert (labels[20:30, 20:30] == 9).all() and (labels[6:8, 6:8] == 0).all()  # the hand edits stay
    assert (labels[5:20, 5:25] == 0).all() and (labels[10:15, 30:35] == 2).all()  # object 1 is gone
    writer.note_id(3)  # a smaller id changes nothing
    assert writer.next_id() == 10


def test_a_commit_that_changes_nothing_is_no_undo_step():
    labels = np.zeros((20, 20), np.uint8)
    labels[0:10, 0:10] = 3
    writer = LabelWriter(labels)
    writer.commit((), [_obj(12, 18, 12, 18)])
    c = writer.commit((), [_obj(0, 5, 0, 5)])  # entirely over object 3
    assert c.pixels == (0,) and len(writer.history) == 1
    writer.undo()
    assert (labels[12:18, 12:18] == 0).all() and (labels[0:10, 0:10] == 3).all()  # the real commit was undone


def test_a_whole_plane_boolean_array_is_an_object_too():
    labels = np.zeros((2, 20, 30), np.uint16)
    writer = LabelWriter(labels)
    mask = np.zeros((20, 30), bool)
    mask[3:7, 10:20] = True
    c = writer.commit((1,), [mask])
    assert c.ids == (1,) and (labels[1] == 1).sum() == 40 and c.region == (3, 7, 10, 20)
    with pytest.raises(ValueError, match=r"a PlaneMask or a boolean \(20, 30\) plane, not a bool array of shape"):
        writer.commit((1,), [np.ones((5, 5), bool)])


def test_a_path_never_opens_an_image_or_foreign_array_as_labels(tmp_path):
    image = zarr.create_array(str(tmp_path / "img.zarr"), shape=(3, 16, 16), dtype="uint16")
    image[...] = 7
    with pytest.raises(ValueError, match="is a Zarr array napari-sam did not write"):
        create_label_store(tmp_path / "img.zarr", (3, 16, 16))
    again = zarr.open_array(str(tmp_path / "img.zarr"), mode="r")
    assert (np.asarray(again) == 7).all() and "napari_sam_max_id" not in dict(again.attrs)
    ours = create_label_store(tmp_path / "labels.zarr", (3, 16, 16))
    assert create_label_store(tmp_path / "labels.zarr", (3, 16, 16)).shape == ours.shape  # ours reopens


def test_a_brush_stroke_between_reading_and_writing_a_region_stays():
    # the viewer's brush writes on the GUI thread while a commit computes in a worker: the
    # commit must write only the pixels it changes, not its whole region as it read it
    labels = np.zeros((1, 32, 32), np.uint32)
    writer = LabelWriter(labels)
    before = labels[0, 4:20, 4:20].copy()
    after = before.copy()
    after[2:6, 2:6] = 1
    labels[0, 15, 15] = 9  # painted by hand after the commit read the region
    writer._write((0,), (4, 20, 4, 20), before, after, 1)
    assert labels[0, 15, 15] == 9 and (labels[0, 6:10, 6:10] == 1).all() and (labels == 1).sum() == 16
