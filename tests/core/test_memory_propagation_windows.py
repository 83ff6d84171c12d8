"""Windows for propagation with SAM 2 on planes larger than its input: the lattice, the
window around an object, when a window follows it, and objects sharing windows."""

import numpy as np
import pytest

from napari_sam.core.windows import WindowGrid


def test_windows_lie_on_a_lattice_inside_the_plane_with_the_last_one_shifted_back():
    grid = WindowGrid((1000, 300), side=256, step=64, margin=16)
    assert grid.halo == 96
    rows, cols = grid.grid_shape
    assert (rows, cols) == (13, 2)
    origins = [grid[r, 0].region[0] for r in range(rows)]
    assert origins == [0, 64, 128, 192, 256, 320, 384, 448, 512, 576, 640, 704, 744]
    assert all(w.shape == (256, 256) for w in grid)  # never clipped: S native pixels
    assert grid[0, 1].region == (0, 256, 44, 300)
    small = WindowGrid((100, 80), side=256, step=64)
    assert small.grid_shape == (1, 1) and small[0, 0].region == (0, 100, 0, 80)  # the whole plane
    thin = WindowGrid((100, 2000), side=256, step=64)
    assert {w.shape for w in thin} == {(100, 256)}


@pytest.mark.parametrize("bad", [dict(step=0), dict(step=65), dict(step=300), dict(margin=128)])
def test_bad_window_settings_are_refused_in_one_line(bad):
    with pytest.raises(ValueError, match="window"):
        WindowGrid((1000, 1000), **(dict(side=256, step=64) | bad))


def test_the_window_around_an_object_is_centred_on_it_and_follows_it_near_an_inner_edge():
    grid = WindowGrid((1000, 1000), side=256, step=64, margin=16)
    box = (500, 540, 300, 330)  # centre (520, 315)
    w = grid.around(box)
    centre = ((w.region[0] + w.region[1]) / 2, (w.region[2] + w.region[3]) / 2)
    assert abs(centre[0] - 520) <= 32 and abs(centre[1] - 315) <= 32
    assert grid.holds(w, box) and not grid.near_edge(w, box)
    # the object drifts towards the window's lower edge: within the margin, time to follow
    y1 = w.region[1]
    drifted = (y1 - 40, y1 - 10, 300, 330)
    assert grid.near_edge(w, drifted) and not grid.holds(w, drifted)
    follow = grid.around(drifted)
    assert follow.region[0] > w.region[0] and not grid.near_edge(follow, drifted)
    # at the plane's border there is nowhere to go: no edge to follow across
    corner = grid[0, 0]
    assert not grid.near_edge(corner, (0, 10, 0, 10))


def test_neighbours_share_a_window_and_distant_objects_get_their_own():
    grid = WindowGrid((2000, 2000), side=256, step=64, margin=16)
    boxes = [(100, 130, 100, 130), (150, 180, 160, 190), (1500, 1530, 1500, 1530), (1800, 1830, 300, 330)]
    cover = grid.cover(boxes)
    taken = sorted(i for _, ids in cover for i in ids)
    assert taken == [0, 1, 2, 3]  # each object exactly once
    by_object = {i: w for w, ids in cover for i in ids}
    assert by_object[0] == by_object[1]
    assert len({w.index for w, _ in cover}) == 3
    for i, w in by_object.items():
        assert grid.holds(w, boxes[i])


def test_an_object_larger_than_a_window_gets_the_window_around_it():
    grid = WindowGrid((2000, 2000), side=256, step=64, margin=16)
    huge = (500, 900, 500, 900)
    [(w, ids)] = grid.cover([huge])
    assert ids == [0] and w == grid.around(huge)
    assert np.isclose((w.region[0] + w.region[1]) / 2, 700, atol=32)


# -- the engine's logic with an exact tracker ---------------------------------------------
# SAM 2 with random weights says nothing about where an object is. To check what the
# engine does with an answer (windows that follow, stop rule, who owns which plane), the
# video session is replaced here by one that answers with the ground-truth object in the
# window it is given, as tests/core/test_propagation.py does for SAM.

from napari_sam.core.image_source import ImageSource  # noqa: E402
from napari_sam.core.masks import PlaneMask  # noqa: E402
from napari_sam.core.memory_propagation import MemorySettings, propagate_objects  # noqa: E402


class _Frames:
    def __init__(self, planes, window):
        self.planes, self.window = planes, window

    def __call__(self, i):
        raise AssertionError("the exact session reads the ground truth, not features")


class ExactFeatures:
    """What propagate_objects needs of Sam2Features: the image's planes and its windows."""

    def __init__(self, gt, side, step, margin, axes):
        self.gt = gt
        self.source = ImageSource(gt, axes)
        self.windows = WindowGrid(gt.shape[-2:], side, step, margin)
        self.model = None
        self.sessions = []

    def frames(self, planes, window):
        return _Frames(planes, window)


class ExactVideo:
    """A session answering with the ground-truth object inside its window."""

    def __init__(self, gt, model, features, num_frames, video_size):
        self.gt, self.frames, self.objects, self.cond = gt, features, [], {}
        assert tuple(video_size) == features.window.shape and num_frames == len(features.planes)

    def add_mask(self, frame, obj_id, mask):
        assert tuple(mask.shape) == self.frames.window.shape and mask.any()
        self.cond.setdefault(obj_id, []).append(frame)
        if obj_id not in self.objects:
            self.objects.append(obj_id)

    def propagate(self, start=None, max_frames=None, reverse=False):
        import torch

        last = max(start - max_frames, 0) if reverse else min(start + max_frames, len(self.frames.planes) - 1)
        for frame in range(start, last + (-1 if reverse else 1), -1 if reverse else 1):
            crop = self.gt[self.frames.planes[frame]][self.frames.window.slices]
            yield frame, list(self.objects), torch.stack([torch.where(torch.from_numpy(crop == i), 10.0, -10.0)
                                                          for i in self.objects])


@pytest.fixture
def exact(monkeypatch):
    def make(gt, side=128, step=32, margin=8, axes="ZYX"):
        features, sessions = ExactFeatures(gt, side, step, margin, axes), []

        def session(*args, **kwargs):
            sessions.append(ExactVideo(gt, *args, **kwargs))
            return sessions[-1]

        monkeypatch.setattr("napari_sam.model.sam2.video.Sam2Video", session)
        return features, sessions

    return make


def _moving_disk(Z=12, H=100, W=420, r=12, speed=30):
    yy, xx = np.mgrid[:H, :W]
    gt = np.zeros((Z, H, W), np.uint16)
    for z in range(Z):
        gt[z][(yy - 50) ** 2 + (xx - 30 - speed * z) ** 2 < r**2] = 1
    return gt


def test_the_window_follows_a_moving_object_with_a_new_memory_bank(exact):
    gt = _moving_disk()
    features, sessions = exact(gt, margin=32)  # the margin must exceed the motion per plane (30)
    steps = list(propagate_objects(features, {1: {0: PlaneMask.from_full(gt[0] == 1)}}))
    found = {s.plane[0]: s.masks[1] for s in steps if 1 in s.masks}
    assert sorted(found) == list(range(1, 12))  # only forward: plane 0 is the first
    for z, mask in found.items():
        np.testing.assert_array_equal(mask.to_full(gt.shape[1:]), gt[z] == 1)
    windows = [s.window for s in steps]
    assert len(set(windows)) >= 3  # 330 pixels of travel through 128-pixel windows
    for s in steps:
        y0, y1, x0, x1 = s.window
        r = s.masks[1].region
        assert y0 <= r[0] and r[1] <= y1 and x0 <= r[2] and r[3] <= x1
    # each window after the first is a new session seeded with the last mask on the plane before
    assert len(sessions) == len(set(windows))
    last_in = {}
    for s in steps:
        last_in[s.window] = s.plane[0]
    for before, after in zip(sessions, sessions[1:]):
        assert after.objects == [1] and after.cond[1] == [last_in[before.frames.window.region]]
    assert steps[-1].done == steps[-1].total == 11


def test_objects_end_where_they_end_and_prompted_planes_split_the_stack(exact):
    Z, H, W = 14, 60, 60
    yy, xx = np.mgrid[:H, :W]
    gt = np.zeros((Z, H, W), np.uint16)
    for z in range(2, 12):  # object 1 lives on planes 2..11
        gt[z][(yy - 20) ** 2 + (xx - 20) ** 2 < 64] = 1
    for z in range(0, 14):  # object 2 on every plane
        gt[z][(yy - 45) ** 2 + (xx - 45) ** 2 < 49] = 2
    features, sessions = exact(gt)
    objects = {1: {6: PlaneMask.from_full(gt[6] == 1)},
               2: {3: PlaneMask.from_full(gt[3] == 2), 9: PlaneMask.from_full(gt[9] == 2)}}
    steps = list(propagate_objects(features, objects, settings=MemorySettings(stop_after=2)))
    by = {}
    for s in steps:
        for i in s.masks:
            by.setdefault(i, []).append(s.plane[0])
    assert sorted(by[1]) == [2, 3, 4, 5, 7, 8, 9, 10, 11]
    ended = [(s.plane[0], s.ended) for s in steps if s.ended]
    assert (13, (1,)) in ended and (0, (1,)) in ended  # two empty planes past each end
    # object 2: planes 3 and 9 are prompted; 3 owns 0..6, 9 owns 7..13, neither writes the other
    assert sorted(by[2]) == [0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12, 13]
    assert len(by[2]) == len(set(by[2]))
    # one session per prompted plane and group, each knowing all of its objects' prompted planes
    assert sorted(tuple(v.objects) for v in sessions) == [(1,), (2,), (2,)]
    assert all(v.cond[2] == [3, 9] for v in sessions if v.objects == [2])
    assert steps[-1].done == steps[-1].total
    # a correction on plane 9 alone rewrites only the planes it owns
    again = list(propagate_objects(features, objects, starts={2: [9]}))
    assert sorted({s.plane[0] for s in again}) == [7, 8, 10, 11, 12, 13]
    with pytest.raises(ValueError, match="was not prompted on plane"):
        list(propagate_objects(features, objects, starts={2: [5]}))


def test_a_tzyx_stack_is_followed_along_the_chosen_axis_at_each_objects_other_index(exact):
    T, Z, H, W = 3, 6, 40, 40
    yy, xx = np.mgrid[:H, :W]
    gt = np.zeros((T, Z, H, W), np.uint16)
    gt[:, :, (yy - 20) ** 2 + (xx - 20) ** 2 < 36] = 1
    gt[1, :, (yy - 8) ** 2 + (xx - 8) ** 2 < 16] = 2
    features, _ = exact(gt, axes="TZYX")
    objects = {1: {(0, 2): PlaneMask.from_full(gt[0, 2] == 1)}, 2: {(1, 4): PlaneMask.from_full(gt[1, 4] == 2)}}
    along_z = list(propagate_objects(features, objects))
    along_t = list(propagate_objects(features, {1: {(1, 2): PlaneMask.from_full(gt[1, 2] == 1)}}, axis="T"))
    assert sorted(s.plane for s in along_z if 1 in s.masks) == [(0, z) for z in (0, 1, 3, 4, 5)]
    assert sorted(s.plane for s in along_z if 2 in s.masks) == [(1, z) for z in (0, 1, 2, 3, 5)]
    assert sorted(s.plane for s in along_t) == [(0, 2), (2, 2)]
    # one nucleus labelled at two time points: followed along Z at each, from its own plane there
    both = list(propagate_objects(features, {1: {(0, 2): objects[1][(0, 2)],
                                                 (1, 3): PlaneMask.from_full(gt[1, 3] == 1)}}))
    assert sorted(s.plane for s in both if 1 in s.masks) == [(t, z) for t in (0, 1) for z in range(6)
                                                             if (t, z) not in ((0, 2), (1, 3))]
    with pytest.raises(ValueError, match="was not prompted on plane"):
        list(propagate_objects(features, {1: {(0, 2): objects[1][(0, 2)]}}, starts={1: [(1, 2)]}))
