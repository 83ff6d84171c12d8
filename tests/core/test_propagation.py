"""Propagation through planes: prompts from the previous answer, stopping rules, labels
written plane by plane. SAM is replaced by an exact segmenter over real 3D nuclei (the
ground-truth object under the prompts), so the expected result is known: the object."""

from types import SimpleNamespace

import numpy as np
import pytest

from napari_sam.api import Annotator
from napari_sam.core.image_source import ImageSource
from napari_sam.core.masks import PlaneMask
from napari_sam.core.propagation import PropagationSettings, propagate
from napari_sam.core.tiled_segmentation import segment_tiled
from napari_sam.core.tiling import TileGrid


class ExactEmbeddings:
    """Stands in for Embeddings: answers with the ground-truth object under the prompts."""

    def __init__(self, labels, iou=0.9, image=None):
        self.labels = labels
        self.source = ImageSource(labels if image is None else image, "ZYX")
        self.grid = TileGrid(labels.shape[1:], tile=1024, halo=0)
        self.iou = iou
        self.prompts = []

    def predict(self, plane, tile=(0, 0), points=None, labels=None, box=None, mask_input=None, multimask=True):
        self.prompts.append((plane, points, box, mask_input is not None))
        view = self.labels[plane]
        if points is not None:
            x, y = points[0]
            obj = view[int(y), int(x)]
        else:
            x0, y0, x1, y1 = np.round(box).astype(int)
            ids, counts = np.unique(view[y0:y1, x0:x1], return_counts=True)
            counts[ids == 0] = 0
            obj = ids[np.argmax(counts)] if counts.max() else 0
        mask = (view == obj) & (obj > 0)
        return SimpleNamespace(masks=mask[None], iou=np.array([self.iou]),
                               low_res_logits=np.zeros((1, 256, 256), np.float32))

    def segment(self, plane, prompt, multimask=None, max_tiles=16, refine=True):
        """As Embeddings.segment: the tiled answer of ``prompt``, each tile asked through
        :meth:`predict`."""

        def answer(tile, points, labels, box, multi, mask_input=None):
            result = self.predict(plane, tile.index, points, labels, box, mask_input, multi)
            return _Candidates(result.masks, result.low_res_logits), result.iou

        return segment_tiled(self.grid, answer, prompt, multimask, max_tiles)


class _Candidates(list):
    """Candidate masks that carry their low-res logits, as the decoder's answers do."""

    def __init__(self, masks, low_res_logits):
        super().__init__(masks)
        self.low_res_logits = low_res_logits


def _start(gt, obj):
    areas = (gt == obj).sum(axis=(1, 2))
    zs = np.flatnonzero(areas)
    z = int(np.argmax(areas))
    m = gt[z] == obj
    r, c = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return z, zs, PlaneMask((r[0], r[-1] + 1, c[0], c[-1] + 1), m[r[0] : r[-1] + 1, c[0] : c[-1] + 1], 1.0, ())


def test_exact_answers_recover_whole_nuclei_and_stop_where_they_end(nuclei_3d):
    gt = nuclei_3d[1]
    checked = 0
    for obj in np.unique(gt)[1:12]:
        z, zs, start = _start(gt, obj)
        if not np.array_equal(zs, np.arange(zs[0], zs[-1] + 1)) or len(zs) < 5:
            continue
        emb = ExactEmbeddings(gt)
        settings = PropagationSettings(min_consecutive_iou=0.0, min_area=1, min_contrast=None)
        steps = list(propagate(emb, z, start, settings=settings))
        written = {s.plane[0] for s in steps if s.mask is not None}
        areas = (gt == obj).sum(axis=(1, 2))
        # every plane where the nucleus is more than a sliver, and none where it is absent
        assert {int(p) for p in zs if areas[p] >= 0.2 * areas.max()} - {z} <= written <= set(zs.tolist()) - {z}, obj
        for s in steps:
            if s.mask is not None:
                assert np.array_equal(s.mask.to_full(gt.shape[1:]), gt[s.plane[0]] == obj)
        ends = [s for s in steps if s.stopped]
        assert all("ended" in s.stopped for s in ends)
        checked += 1
    assert checked >= 5


def test_prompts_combine_box_points_and_the_previous_logits(nuclei_3d):
    gt = nuclei_3d[1]
    z, _, start = _start(gt, np.unique(gt)[3])
    emb = ExactEmbeddings(gt)
    settings = PropagationSettings(use_points=True, use_mask=True, points=2, max_planes=3, box_margin=0.1)
    list(propagate(emb, z, start, directions=(1,), settings=settings))
    plane, points, box, with_mask = emb.prompts[0]
    assert plane == (z + 1,) and len(points) == 2 and box is not None and not with_mask
    assert all(p[3] for p in emb.prompts[1:])  # from the second plane on, the logits come back
    ys, xs = np.nonzero(start.to_full(gt.shape[1:]))
    assert box[0] <= xs.min() and box[2] >= xs.max() and box[1] <= ys.min() and box[3] >= ys.max()
    list(propagate(emb := ExactEmbeddings(gt), z, start, directions=(1,),
                   settings=PropagationSettings(use_points=False, use_mask=False, max_planes=2)))
    assert all(p[1] is None and p[2] is not None and not p[3] for p in emb.prompts)


@pytest.mark.parametrize(
    "settings, iou, reason",
    [
        (PropagationSettings(min_predicted_iou=0.95), 0.9, "predicted IoU 0.90 < 0.95"),
        (PropagationSettings(min_area=10**6), 0.9, "the object ended"),
    ],
)
def test_stopping_rules(nuclei_3d, settings, iou, reason):
    gt = nuclei_3d[1]
    z, _, start = _start(gt, np.unique(gt)[4])
    if settings.min_area > 1000:
        with pytest.raises(ValueError, match="fewer than min_area"):
            list(propagate(ExactEmbeddings(gt, iou), z, start, settings=settings))
        return
    steps = list(propagate(ExactEmbeddings(gt, iou), z, start, settings=settings))
    assert 1 <= len(steps) <= 2 and all(s.stopped == reason and s.mask is None for s in steps)


def test_a_jump_to_another_object_stops_propagation():
    gt = np.zeros((5, 40, 40), np.uint16)
    gt[:3, 5:15, 5:15] = 1
    gt[3:, 5:15, 8:30] = 2  # the next plane holds another object, mostly beside it
    emb = ExactEmbeddings(gt)
    start = PlaneMask((5, 15, 5, 15), np.ones((10, 10), bool), 1.0, ())
    settings = PropagationSettings(use_box=False, use_points=True)
    steps = list(propagate(emb, 1, start, directions=(1,), settings=settings))
    assert steps[0].mask is not None and steps[0].plane == (2,)
    assert steps[-1].plane == (3,) and steps[-1].mask is None
    assert "IoU with the previous plane" in steps[-1].stopped


def test_bad_requests():
    emb = ExactEmbeddings(np.zeros((3, 10, 10), np.uint16))
    start = PlaneMask((0, 5, 0, 5), np.ones((5, 5), bool), 1.0, ())
    with pytest.raises(ValueError, match="not a plane axis"):
        list(propagate(emb, 0, start, axis="T"))
    with pytest.raises(ValueError, match="needs a box or points"):
        PropagationSettings(use_box=False, use_points=False)


def test_annotator_writes_each_plane_under_the_id_and_undoes_at_once(tiny_model, nuclei_3d, monkeypatch):
    image, gt = nuclei_3d
    ann = Annotator(image, tiny_model, cache=False)
    exact = ExactEmbeddings(gt)
    monkeypatch.setattr(ann.embeddings, "segment", exact.segment)
    obj = np.unique(gt)[6]
    z, zs, start = _start(gt, obj)
    ann.commit(z, [start])
    ann.labels[z - 3, :4, :4] = 99  # another object the propagation must not damage
    steps = list(ann.propagate(z, 1, settings=PropagationSettings(min_consecutive_iou=0.0, min_area=1,
                                                                  min_contrast=None)))
    planes = [s.plane[0] for s in steps if s.mask is not None]
    assert len(planes) >= 4
    for p in planes + [z]:
        assert np.array_equal(ann.labels[p] == 1, gt[p] == obj)
    assert (ann.labels[z - 3, :4, :4] == 99).all()
    ann.undo()  # the propagation, all planes at once
    assert (ann.labels == 1).sum() == (gt[z] == obj).sum()
    # cancelled half-way: what was written stays consistent
    run = ann.propagate(z, 1)
    next(run)
    run.close()
    assert (ann.labels == 1).any(axis=(1, 2)).sum() == 2


def test_propagating_every_object_is_one_undo_step_and_names_ids_it_lacks(tiny_model, nuclei_3d, monkeypatch):
    image, gt = nuclei_3d
    ann = Annotator(image, tiny_model, cache=False)
    monkeypatch.setattr(ann.embeddings, "segment", ExactEmbeddings(gt).segment)
    committed = []
    for k in (6, 9):
        obj = np.unique(gt)[k]
        z, _, start = _start(gt, obj)
        ann.commit(z, [start])
        committed.append((ann.labels == ann.writer.max_id()).sum())
    settings = PropagationSettings(min_consecutive_iou=0.0, min_area=1, min_contrast=None)
    written = ann.propagate_all(settings=settings, progress=False)
    assert sorted(written) == [1, 2] and all(len(p) >= 2 for p in written.values())
    ann.undo()  # every object's propagation at once
    assert [(ann.labels == i).sum() for i in (1, 2)] == committed
    steps = ann.propagate_all_steps(settings=settings)
    next(steps)
    steps.close()  # cancelled: what was written is one undo step too
    ann.undo()
    assert [(ann.labels == i).sum() for i in (1, 2)] == committed
    assert ann.propagate_all(ids=2, settings=settings, progress=False).keys() == {2}  # one id, not a list
    with pytest.raises(ValueError, match=r"no object \[99\] in the labels"):
        ann.propagate_all(ids=[99], progress=False)
    empty = Annotator(image, tiny_model, cache=False)
    for run in (lambda: empty.propagate_all(progress=False), empty.propagate_all_steps):  # said, not "0 planes"
        with pytest.raises(ValueError, match="no objects to propagate: the labels hold none"):
            run()


def _one_object_committed(model, nuclei_3d, monkeypatch):
    """An Annotator answering exactly, with one nucleus committed as object 1 on its largest plane."""
    image, gt = nuclei_3d
    ann = Annotator(image, model, cache=False)
    monkeypatch.setattr(ann.embeddings, "segment", ExactEmbeddings(gt).segment)
    obj = np.unique(gt)[6]
    z, _, start = _start(gt, obj)
    ann.commit(z, [start])
    return ann, gt, obj, z


def test_propagating_again_replaces_the_objects_earlier_planes_and_an_open_run_blocks_commits(tiny_model, nuclei_3d,
                                                                                             monkeypatch):
    ann, gt, obj, z = _one_object_committed(tiny_model, nuclei_3d, monkeypatch)
    wrong = np.zeros(gt.shape[1:], bool)
    wrong[:5, :5] = True  # a stray piece of object 1 on the next plane, from an earlier bad run
    ann.labels[z + 1][wrong] = 1
    settings = PropagationSettings(min_consecutive_iou=0.0, min_area=1, min_contrast=None)
    list(ann.propagate(z, 1, settings=settings))
    assert np.array_equal(ann.labels[z + 1] == 1, gt[z + 1] == obj)  # the new answer alone
    # a run left open: a commit or an undo would join it or cut it in half
    run = ann.propagate(z, 1, settings=settings)
    next(run)
    with pytest.raises(RuntimeError, match="propagation is still open"):
        ann.undo()
    with pytest.raises(RuntimeError, match="propagation is still open"):
        ann.commit(0, [PlaneMask.from_full(wrong)])
    run.close()
    assert ann.undo()  # closed, it is one step again


def test_every_time_points_stack_starts_on_its_own_and_specks_are_skipped():
    from napari_sam.core.memory_labels import propagation_starts

    labels = np.zeros((2, 5, 20, 20), np.uint16)
    labels[0, 2, 2:8, 2:8] = 3
    labels[0, 1, 2:5, 2:5] = 3
    labels[1, 3, 2:9, 2:9] = 3
    labels[1, 0, 15:17, 15:17] = 9  # a speck of 4 pixels
    starts, skipped = propagation_starts(labels, "TZ", "Z", min_area=10)
    assert starts == [(3, (0, 2)), (3, (1, 3))]
    assert skipped == ["object 9 on plane (1, 0) (4 pixel(s))"]
    assert propagation_starts(labels, "TZ", "T", min_area=10)[0] == [(3, (1, 3))]  # followed in time: once


def test_a_speck_among_the_objects_is_skipped_with_a_warning(tiny_model, nuclei_3d, monkeypatch):
    ann, *_ = _one_object_committed(tiny_model, nuclei_3d, monkeypatch)
    ann.labels[0, :2, :2] = 9
    settings = PropagationSettings(min_consecutive_iou=0.0, min_area=10, min_contrast=None)
    with pytest.warns(UserWarning, match=r"not propagated, smaller than min_area=10: object 9 on plane \(0,\)"):
        written = ann.propagate_all(settings=settings, progress=False)
    assert list(written) == [1] and len(written[1]) >= 2
    with pytest.raises(ValueError, match="max_planes must be at least 1"):
        PropagationSettings(max_planes=0)
