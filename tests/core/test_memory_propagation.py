"""Propagation with SAM 2's memory through the core engine and the Annotator, with the
randomised reference model of tests/reference/sam2 (its quality means nothing: these tests
check shapes, ids, the planes written, both directions, cancel, undo, the writing rules
and corrections, not where the masks lie)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_sam.api import Annotator
from napari_sam.core.masks import PlaneMask
from napari_sam.core.memory_propagation import MemorySettings, MemoryStep, propagate_objects, territory
from napari_sam.core.sam2_features import Sam2Features

REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "sam2" / "sam2_small_seed0"


def reference_sam2(image_size: int = 128):
    """The reference set's randomised SAM 2 (official config and weights), at a smaller
    input so that a frame takes a fraction of a second (its weights fit any input size)."""
    from napari_sam.model.sam2 import config_from_official, sam2_from_state_dict

    config = config_from_official(json.loads((REFERENCE / "config.json").read_text()), name="sam2_small_seed0")
    state = torch.load(REFERENCE / "weights.pth", map_location="cpu", weights_only=True)
    return sam2_from_state_dict(state, dataclasses.replace(config, image_size=image_size)).eval()


@pytest.fixture(scope="module")
def sam2():
    return reference_sam2()


def two_disks(Z=8, H=64, W=80):
    """(Z, H, W) uint8 stack with two bright disks, and seeds: both objects on plane 3."""
    rng = np.random.default_rng(0)
    volume = (rng.random((Z, H, W)) * 40).astype(np.uint8)
    yy, xx = np.mgrid[:H, :W]
    seeds = np.zeros((Z, H, W), np.uint32)
    for z in range(Z):
        one = (yy - 20) ** 2 + (xx - 20 - 2 * z) ** 2 < 100
        two = (yy - 45) ** 2 + (xx - 55) ** 2 < (12 - abs(z - 4)) ** 2
        volume[z][one] += 180
        volume[z][two] += 120
        if z == 3:
            seeds[z][one], seeds[z][two] = 1, 2
    return volume, seeds


def test_territories_split_the_stack_between_prompted_planes():
    assert territory([3], 3, 8) == (0, 7)
    assert territory([3, 9], 3, 14) == (0, 6) and territory([3, 9], 9, 14) == (7, 13)
    assert territory([3, 4], 4, 8) == (4, 7) and territory([3, 4], 3, 8) == (0, 3)
    assert territory([5], 5, 20, max_planes=2) == (3, 7)


def test_objects_go_both_ways_from_their_prompted_plane_in_one_session(sam2):
    volume, seeds = two_disks()
    features = Sam2Features(volume, sam2, cache=False, axes="ZYX")
    objects = {i: {3: PlaneMask.from_full(seeds[3] == i)} for i in (1, 2)}
    steps = list(propagate_objects(features, objects))
    assert all(isinstance(s, MemoryStep) for s in steps)
    planes = [s.plane[0] for s in steps]
    assert planes == [4, 5, 6, 7, 2, 1, 0]  # forward first, then back; the prompted plane is the user's
    assert {s.window for s in steps} == {(0, 64, 0, 80)}  # the plane fits the input: one window, one session
    assert {i for s in steps for i in s.masks} == {1, 2}
    for s in steps:
        for mask in s.masks.values():
            y0, y1, x0, x1 = mask.region
            assert 0 <= y0 < y1 <= 64 and 0 <= x0 < x1 <= 80 and mask.mask.shape == (y1 - y0, x1 - x0)
            assert mask.area >= 1
    assert [s.done for s in steps] == sorted(s.done for s in steps)
    assert steps[-1].done == steps[-1].total == 14  # 7 planes x 2 objects
    assert features.computed == 8  # every plane embedded once, although two directions and two objects


@pytest.mark.parametrize("stop_after, planes", [(1, [4, 2]), (2, [4, 5, 2, 1])])
def test_an_object_ends_after_stop_after_planes_without_it(sam2, stop_after, planes):
    volume, seeds = two_disks()
    features = Sam2Features(volume, sam2, cache=False, axes="ZYX")
    objects = {i: {3: PlaneMask.from_full(seeds[3] == i)} for i in (1, 2)}
    # no mask can have a million pixels here: every plane counts as "object absent"
    steps = list(propagate_objects(features, objects, settings=MemorySettings(stop_after=stop_after,
                                                                              min_area=10**6)))
    assert [s.plane[0] for s in steps] == planes
    assert all(not s.masks for s in steps)
    assert [s.ended for s in steps if s.ended] == [(1, 2), (1, 2)]
    assert steps[-1].stopped == "objects 1, 2 ended"
    assert steps[-1].done == steps[-1].total == 14


def test_max_planes_limits_each_direction(sam2):
    volume, seeds = two_disks()
    features = Sam2Features(volume, sam2, cache=False, axes="ZYX")
    steps = list(propagate_objects(features, {1: {3: PlaneMask.from_full(seeds[3] == 1)}},
                                   settings=MemorySettings(max_planes=2)))
    assert [s.plane[0] for s in steps] == [4, 5, 2, 1]


def test_bad_objects_are_refused_in_one_line(sam2):
    volume, seeds = two_disks()
    features = Sam2Features(volume, sam2, cache=False, axes="ZYX")
    good = PlaneMask.from_full(seeds[3] == 1)
    with pytest.raises(ValueError, match="empty mask on plane"):
        list(propagate_objects(features, {1: {3: PlaneMask.from_full(np.zeros((64, 80), bool))}}))
    with pytest.raises(ValueError, match="no objects"):
        list(propagate_objects(features, {}))
    with pytest.raises(ValueError, match="not a plane axis"):
        list(propagate_objects(features, {1: {3: good}}, axis="T"))
    with pytest.raises(ValueError, match="at least 1"):
        MemorySettings(stop_after=0)
    flat = Sam2Features(volume[0], sam2, cache=False, axes="YX")
    with pytest.raises(ValueError, match="2D image"):
        list(propagate_objects(flat, {1: {0: good}}))


def _changed_planes(a, b):
    return [z for z in range(a.shape[0]) if not np.array_equal(a[z], b[z])]


def test_the_annotator_propagates_all_objects_with_sam2_in_one_undo_step(sam2):
    volume, seeds = two_disks()
    ann = Annotator(volume, sam2, seeds.copy(), axes="ZYX", cache=False)
    assert ann.model is None and ann.tracking is not None
    with pytest.raises(ValueError, match="segmenting from prompts needs a SAM"):
        ann.segment(3, points=[[20, 20]])
    written = ann.propagate_all(progress=False)
    assert set(written) == {1, 2}
    assert set(written[1]) <= {(z,) for z in (0, 1, 2, 4, 5, 6, 7)} and len(written[1]) >= 5
    np.testing.assert_array_equal(ann.labels[3], seeds[3])  # the prompted plane is the user's
    assert set(np.unique(ann.labels)) <= {0, 1, 2}
    for label_id, planes in written.items():
        for (z,) in planes:
            assert (ann.labels[z] == label_id).any()
    undone = ann.undo()
    assert len(undone) == sum(1 for z in range(8) if z != 3)  # one step: every plane written
    np.testing.assert_array_equal(ann.labels, seeds)


def test_cancel_keeps_the_planes_written_and_undo_removes_them_together(sam2):
    volume, seeds = two_disks()
    ann = Annotator(volume, sam2, seeds.copy(), axes="ZYX", cache=False)
    steps = ann.propagate_all_steps()
    first = next(steps)
    second = next(steps)
    steps.close()  # the user pressed cancel
    assert _changed_planes(ann.labels, seeds) == [first.plane[0], second.plane[0]] == [4, 5]
    assert len(ann.writer.history) == 1
    ann.undo()
    np.testing.assert_array_equal(ann.labels, seeds)


def test_other_objects_are_kept_and_the_objects_own_earlier_pixels_replaced(sam2):
    volume, seeds = two_disks()
    labels = seeds.copy()
    labels[:, 50:, :20] = 9  # another object on every plane, not propagated
    stale = np.zeros((64, 80), bool)  # earlier pixels of object 1 on plane 5, spread over the plane
    stale[2:48:9, 25:80:9] = True
    labels[5][stale] = 1
    ann = Annotator(volume, sam2, labels, axes="ZYX", cache=False)
    steps = list(ann.propagate(3, 1))
    assert {s.plane[0] for s in steps} == {0, 1, 2, 4, 5, 6, 7}
    np.testing.assert_array_equal(ann.labels[:, 50:, :20], 9)  # never overwritten without consent
    on5 = next(s for s in steps if s.plane == (5,))
    assert on5.mask is not None
    new = on5.mask.to_full((64, 80))
    assert (stale & ~new).any()  # some earlier pixels lie outside the new answer...
    np.testing.assert_array_equal(ann.labels[5] == 1, new & (labels[5] != 9))  # ...and are gone
    ann.undo()
    np.testing.assert_array_equal(ann.labels, labels)


def test_a_correction_repropagates_the_planes_it_owns_and_nothing_else(sam2):
    volume, seeds = two_disks()
    ann = Annotator(volume, sam2, seeds.copy(), axes="ZYX", cache=False)
    ann.propagate_all(progress=False)
    before = np.array(ann.labels)
    corrected = np.zeros((64, 80), bool)
    corrected[40:62, 2:24] = True  # object 1 on plane 6 drawn elsewhere
    plane6 = ann.labels[6]
    plane6[plane6 == 1] = 0
    plane6[corrected & (plane6 == 0)] = 1
    after_edit = np.array(ann.labels)
    steps = list(ann.propagate(6, 1))
    assert [s.plane[0] for s in steps] == [7, 5]  # plane 3 owns 0..4, plane 6 owns 5..7
    np.testing.assert_array_equal(ann.labels[:5], before[:5])
    np.testing.assert_array_equal(ann.labels[6], after_edit[6])
    assert not np.array_equal(ann.labels[7] == 1, before[7] == 1)  # the correction reached the plane after it
    ann.undo()
    np.testing.assert_array_equal(ann.labels, after_edit)


def test_propagating_again_reads_the_features_from_the_cache(sam2, tmp_path):
    volume, seeds = two_disks()
    first = Annotator(volume, sam2, seeds.copy(), axes="ZYX", cache=tmp_path / "c.zarr")
    first.propagate_all(progress=False)
    assert first.tracking.features.computed == 8
    again = Annotator(volume, sam2, seeds.copy(), axes="ZYX", cache=tmp_path / "c.zarr")
    again.propagate_all(progress=False)
    assert again.tracking.features.computed == 0
    np.testing.assert_array_equal(again.labels, first.labels)


def test_seeds_drawn_makes_every_drawn_plane_a_prompted_plane(sam2):
    volume, seeds = two_disks()
    seeds[6][seeds[3] == 1] = 1  # object 1 drawn on planes 3 and 6
    ann = Annotator(volume, sam2, seeds.copy(), axes="ZYX", cache=False)
    written = ann.propagate_all(ids=[1], progress=False, seeds="drawn")
    assert (3,) not in written[1] and (6,) not in written[1]
    np.testing.assert_array_equal(ann.labels[6], seeds[6])
    with pytest.raises(ValueError, match="seeds must be one of"):
        ann.propagate_all(progress=False, seeds="every")


def test_a_commit_that_replaces_clears_the_objects_earlier_pixels_and_only_those():
    from napari_sam.core.labels import LabelWriter

    labels = np.zeros((2, 20, 20), np.uint32)
    labels[1, 0:3, 0:3] = 4  # object 4's earlier pixels, far from its new mask
    labels[1, 10:14, 10:14] = 7  # another object
    writer = LabelWriter(labels)
    new = PlaneMask.from_full(np.pad(np.ones((6, 6), bool), ((8, 6), (8, 6))))  # rows/cols 8..13
    commit = writer.commit((1,), [new], ids=[4], replace=True)
    assert commit.region == (0, 14, 0, 14)  # the region also covers the cleared pixels, for undo
    assert not (labels[1, 0:3, 0:3]).any()
    assert (labels[1, 10:14, 10:14] == 7).all()  # other objects kept
    assert ((labels[1] == 4) == (new.to_full((20, 20)) & (labels[1] != 7))).all()
    writer.undo()
    assert (labels[1, 0:3, 0:3] == 4).all() and (labels[1, 8:10, 8:10] == 0).all()
    with pytest.raises(ValueError, match="replace=True needs the ids"):
        writer.commit((1,), [new], replace=True)


def test_a_correction_that_ends_the_object_sooner_clears_its_old_pixels_beyond(sam2):
    volume, seeds = two_disks()
    ann = Annotator(volume, sam2, seeds.copy(), axes="ZYX", cache=False)
    ann.propagate_all(progress=False)
    assert all((ann.labels[z] == 1).any() for z in (6, 7))
    # the person redraws object 1 small on plane 6; a min_area above it stands for a model that
    # now finds the object absent after that plane (it has ended)
    plane6 = ann.labels[6]
    plane6[plane6 == 1] = 0
    plane6[30:33, 30:33] = np.where(plane6[30:33, 30:33] == 0, 1, plane6[30:33, 30:33])
    after_edit = np.array(ann.labels)
    steps = list(ann.propagate(6, 1, settings=MemorySettings(min_area=5000, stop_after=1)))
    assert any("ended" in s.stopped for s in steps)
    for z in (5, 7):  # the planes plane 6 owns, where the object was decided absent: its old pixels go
        assert not (ann.labels[z] == 1).any(), z
    np.testing.assert_array_equal(ann.labels[:5], after_edit[:5])  # plane 3's planes untouched
    np.testing.assert_array_equal(ann.labels[6], after_edit[6])  # the correction itself stays
    assert (ann.labels == 2).sum() == (after_edit == 2).sum()  # other objects untouched
    ann.undo()
    np.testing.assert_array_equal(ann.labels, after_edit)


def test_a_refused_propagation_remembers_nothing_and_bad_ids_are_named(sam2):
    volume, seeds = two_disks()
    ann = Annotator(volume, sam2, seeds.copy(), axes="ZYX", cache=False)
    with pytest.raises(ValueError, match="not on plane"):
        list(ann.propagate(6, 1))
    assert (6,) not in ann.tracking.prompted.get(1, set())
    for bad in (0, 1.5, -2, True):
        with pytest.raises(ValueError, match="an object's id is an integer"):
            list(ann.propagate(3, bad))
    with pytest.raises(ValueError, match="ids is empty"):
        ann.propagate_all(ids=[], progress=False)
    first = ann.propagate_all(progress=False)
    again = np.array(ann.labels)
    assert ann.propagate_all(progress=False) == first  # plane 6 never became a prompt
    np.testing.assert_array_equal(ann.labels, again)


@pytest.mark.parametrize("store", ["numpy", "zarr"])
def test_a_later_session_on_the_same_labels_keeps_the_plane_a_person_committed(sam2, tmp_path, store):
    from napari_sam.core.label_target import create_label_store

    volume, seeds = two_disks()
    labels = np.zeros_like(seeds) if store == "numpy" else create_label_store(tmp_path / "l.zarr", seeds.shape)
    first = Annotator(volume, sam2, labels, axes="ZYX", cache=False)
    first.commit(3, [seeds[3] == 1])  # the person's object, on plane 3
    committed = np.array(first.labels[3])
    first.propagate_all(progress=False)
    assert max(range(8), key=lambda z: (first.labels[z] == 1).sum()) != 3  # a machine-made plane is larger
    later = Annotator(volume, sam2, labels if store == "numpy" else tmp_path / "l.zarr", axes="ZYX", cache=False)
    before = np.array(later.labels)
    later.propagate_all(progress=False)  # before: from the largest plane, over the person's plane 3
    np.testing.assert_array_equal(later.labels[3], committed)
    np.testing.assert_array_equal(later.labels, before)  # the same prompts give the same planes


def test_a_tzyx_stack_is_followed_along_z_at_every_time_point_and_specks_are_skipped(sam2):
    volume, seeds = two_disks()
    movie = np.stack([volume, volume])  # (T=2, Z, Y, X)
    labels = np.zeros(movie.shape, np.uint32)
    labels[0, 3][seeds[3] == 1] = 1  # the same nucleus drawn at both time points, on different planes
    labels[1, 4][seeds[3] == 1] = 1
    labels[1, 6, 60, 5] = 7  # a stray brush click: one pixel
    ann = Annotator(movie, sam2, labels, axes="TZYX", cache=False)
    from napari_sam.core.memory_propagation import MemorySettings

    with pytest.warns(UserWarning, match=r"object 7 on plane \(1, 6\) \(1 pixel"):
        written = ann.propagate_all(axis="Z", progress=False, settings=MemorySettings(min_area=4))
    assert set(written) == {1}
    assert {t for t, _ in written[1]} == {0, 1}  # each time point's stack from its own drawn plane
    assert (0, 3) not in written[1] and (1, 4) not in written[1]
    assert ann.labels[1, 6, 60, 5] == 7  # the speck is left as it was
    with pytest.raises(ValueError, match="of at least min_area=4 pixels"), pytest.warns(UserWarning, match="object 7"):
        ann.propagate_all(axis="Z", ids=[7], progress=False, settings=MemorySettings(min_area=4))
