"""Annotator.segment_everything: every automatic mode through one method, on a plane or a
whole stack, committed beside the objects already labelled (a tiny SAM with a random
instance decoder: what is checked is where the objects go, not how good they are)."""

import numpy as np
import pytest
import torch

from napari_sam.api import Annotator
from napari_sam.auto import AISSettings, iter_instance_maps, link_planes, segment_ais
from napari_sam.model.instance_decoder import InstanceDecoder, InstanceDecoderConfig
from tests.conftest import drain


def random_decoder(seed: int = 3) -> InstanceDecoder:
    """A narrow instance decoder with random weights and batch-norm statistics (its maps
    then vary enough to hold objects)."""
    torch.manual_seed(seed)
    decoder = InstanceDecoder(InstanceDecoderConfig(initial_features=4))
    with torch.no_grad():
        for name, buf in decoder.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.2)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return decoder.eval()


@pytest.fixture(scope="module")
def decoder_model(tiny_checkpoint):
    """The tiny SAM, loaded apart from the shared one, with an instance decoder set by hand."""
    from napari_sam.core.models import load_model

    model = load_model(tiny_checkpoint, device="cpu", dtype="float32")
    model.instance_decoder = random_decoder()
    return model


@pytest.fixture(scope="module")
def volume(nuclei_3d):
    return np.ascontiguousarray(nuclei_3d[0][40:43, :64, :80])


def median_settings(ann, plane) -> dict:
    """AIS thresholds at the maps' medians: a random decoder's maps then hold many objects."""
    _, maps = drain(iter_instance_maps(ann.embeddings, plane, ann.model.instance_decoder))
    fg, centre, boundary = (float(np.median(m)) for m in maps)
    return {"foreground_threshold": fg, "center_distance_threshold": centre, "boundary_distance_threshold": boundary}


def test_a_plane_is_segmented_by_ais_and_committed_beside_existing_objects(decoder_model, nuclei_2d):
    image = nuclei_2d[0][:96, :128]
    labels = np.zeros(image.shape, np.uint32)
    labels[:20, :20] = 7  # somebody's object
    free = labels == 0
    ann = Annotator(image, decoder_model, labels, cache=False)
    settings = median_settings(ann, 0)
    expected = segment_ais(ann.embeddings, 0, decoder_model.instance_decoder, AISSettings(**settings))
    assert expected.max() > 3 and expected[:20, :20].any()
    found = ann.segment_everything(mode="ais", commit=False, progress=False, **settings)
    assert found.shape == (96, 128) and found.dtype == np.uint32
    np.testing.assert_array_equal(found, expected)
    assert not ann.labels[20:].any()  # commit=False wrote nothing
    # the recommended mode of a model with a decoder is AIS
    np.testing.assert_array_equal(ann.segment_everything(commit=False, progress=False, **settings), expected)

    written = ann.segment_everything(mode="ais", progress=False, **settings)
    assert (ann.labels[:20, :20] == 7).all()  # kept
    assert not written[:20, :20].any()
    n = int(expected.max())
    np.testing.assert_array_equal(np.unique(written[written > 0]), 7 + np.unique(expected[(expected > 0) & free]))
    np.testing.assert_array_equal(ann.labels[written > 0], written[written > 0])
    np.testing.assert_array_equal(written > 0, (expected > 0) & free)
    assert ann.labels.max() <= 7 + n
    [commit] = ann.undo()
    assert commit.plane == () and set(np.unique(ann.labels)) == {0, 7}
    # overwrite lets the objects take the existing object's pixels
    taken = ann.segment_everything(mode="ais", progress=False, overwrite=True, **settings)
    np.testing.assert_array_equal(taken > 0, expected > 0)
    assert (ann.labels[:20, :20][expected[:20, :20] > 0] != 7).all()


def test_a_whole_volume_is_linked_through_z_and_undone_at_once(decoder_model, volume):
    ann = Annotator(volume, decoder_model, axes="ZYX", cache=False)
    settings = median_settings(ann, 1)
    decoder = decoder_model.instance_decoder
    planes = [segment_ais(ann.embeddings, z, decoder, AISSettings(**settings)) for z in range(3)]
    expected = link_planes(planes)
    ann.labels[0, :5, :5] = 1  # an object already there
    existing = ann.labels > 0
    steps = ann.segment_everything_steps(mode="ais", whole_volume=True, **settings)
    reports, written = drain(steps)
    assert [(r.done, r.total) for r in reports if r.stage == "planes"] == [(1, 3), (2, 3), (3, 3)]
    assert written.shape == (3, 64, 80) and expected.max() > 3
    # one id per 3D object, the next free ones, and the same on every plane it reaches
    np.testing.assert_array_equal(written > 0, (expected > 0) & ~existing)
    mask = written > 0
    np.testing.assert_array_equal(written[mask], expected[mask] + 1)
    assert (ann.labels[0, :5, :5] == 1).all()
    np.testing.assert_array_equal(ann.labels[mask], written[mask])
    spanning = [i for i in np.unique(expected[expected > 0]) if (expected == i).any(axis=(1, 2)).sum() > 1]
    assert spanning  # some objects continue through z
    undone = ann.undo()
    assert len(undone) == 3 and set(np.unique(ann.labels)) == {0, 1}


def test_cancelling_a_whole_volume_stops_the_work_and_commits_nothing(decoder_model, volume):
    ann = Annotator(volume, decoder_model, axes="ZYX", cache=False)
    steps = ann.segment_everything_steps(mode="ais", whole_volume=True)
    first = next(steps)
    assert first.stage == "tiles" and first.plane == 0
    steps.close()
    assert ann.is_embedded(0) and not ann.is_embedded(1) and not ann.is_embedded(2)
    assert not ann.labels.any() and ann.writer.history == ()


def test_the_rough_labels_mode_refines_each_object_on_its_plane(decoder_model, volume, monkeypatch):
    from napari_sam.auto import boxes as automatic

    ann = Annotator(volume, decoder_model, axes="ZYX", cache=False)
    rough = np.zeros(volume.shape, np.int32)
    rough[1, 10:30, 10:30] = 4
    rough[1, 40:60, 50:75] = 9
    asked = []
    through_sam = automatic.iter_from_boxes

    def spy(emb, plane, boxes, **kwargs):
        asked.append((plane, boxes))
        return through_sam(emb, plane, boxes, **kwargs)

    monkeypatch.setattr(automatic, "iter_from_boxes", spy)
    written = ann.segment_everything(1, "labels", rough=rough, progress=False)
    assert asked[0][0] == (1,)
    np.testing.assert_array_equal(asked[0][1], [[10, 10, 29, 29], [50, 40, 74, 59]])
    assert written.shape == (64, 80) and 1 <= len(np.unique(written)) - 1 <= 2
    assert ann.labels[1].any() and not ann.labels[0].any() and not ann.labels[2].any()


def test_mistakes_are_refused_in_one_line(decoder_model, tiny_model, volume, nuclei_2d):
    ann = Annotator(volume, decoder_model, axes="ZYX", cache=False)
    with pytest.raises(ValueError, match="3 planes .*give plane="):
        ann.segment_everything(mode="ais", progress=False)
    with pytest.raises(ValueError, match="give rough="):
        ann.segment_everything(0, "labels", progress=False)
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        ann.segment_everything(0, "labels", rough=np.zeros((2, 2), int), progress=False)
    with pytest.raises(ValueError, match="rough labels are for mode 'labels'"):
        ann.segment_everything(0, "ais", rough=np.zeros(volume.shape, int), progress=False)
    with pytest.raises(ValueError, match="unknown automatic mode 'sam2'"):
        ann.segment_everything(0, "sam2", progress=False)
    with pytest.raises(ValueError, match="has no setting 'points_per_side'"):
        ann.segment_everything(0, "ais", points_per_side=4, progress=False)
    flat = Annotator(nuclei_2d[0][:64, :64], tiny_model, cache=False)
    with pytest.raises(ValueError, match="single 2D plane"):
        flat.segment_everything(whole_volume=True, progress=False)
    assert tiny_model.instance_decoder is None
    with pytest.raises(ValueError, match="needs an instance decoder"):
        flat.segment_everything(mode="ais", progress=False)
    assert not flat.labels.any()


def test_a_time_series_of_stacks_segments_the_stack_of_the_chosen_time(decoder_model, volume):
    ann = Annotator(np.stack([volume, volume]), decoder_model, axes="TZYX", cache=False)
    with pytest.raises(ValueError, match="give plane= to choose the stack along Z"):
        ann.segment_everything(mode="boxes", whole_volume=True, progress=False)
    steps = ann.segment_everything_steps((1, 0), "boxes", whole_volume=True, detector="otsu")
    reports, written = drain(steps)
    assert {r.plane for r in reports if r.stage == "planes"} == {3, 4, 5}  # flat numbers of t = 1
    assert written.shape == (3, 64, 80) and written.max() > 0
    assert not ann.labels[0].any() and ann.labels[1].any()
