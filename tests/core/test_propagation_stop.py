"""The contrast stop rule of propagation: SAM, given a box, finds something in it on every
plane, so an object that ends must be stopped by the image. A stand-in segmenter that
answers every box with the box itself (SAM's run-on at its worst) shows the rule at work:
without it the object runs through the whole stack, with it propagation stops on the
first plane past the object's end. The box it gets is the previous answer's own box
(``box_margin=0``), so that the answers stay the same size."""


import numpy as np
import pytest

from napari_sam.core.image_source import ImageSource
from napari_sam.core.masks import PlaneMask
from napari_sam.core.propagation import PropagationSettings, contrast, propagate
from napari_sam.core.tiled_segmentation import segment_tiled
from napari_sam.core.tiling import TileGrid


class BoxFiller:
    """Stands in for Embeddings: every box prompt is answered with the box's pixels."""

    def __init__(self, image):
        self.source = ImageSource(image, "ZYX")
        self.grid = TileGrid(image.shape[1:], tile=1024, halo=0)

    def segment(self, plane, prompt, multimask=None, max_tiles=16, refine=True):
        H, W = self.source.plane_shape

        def answer(tile, points, labels, box, multi, mask_input=None):
            x0, y0, x1, y1 = np.round(box).astype(int)
            mask = np.zeros((H, W), bool)
            mask[y0:y1, x0:x1] = True
            return [mask], np.array([0.9])

        return segment_tiled(self.grid, answer, prompt, multimask, max_tiles)


def _disc_stack(planes=range(5, 13), value=200.0, background=10.0):
    """(20, 40, 40): a bright disc of radius 8 on ``planes``, noise-free background elsewhere."""
    yy, xx = np.mgrid[:40, :40]
    disc = (yy - 20) ** 2 + (xx - 20) ** 2 <= 64
    image = np.full((20, 40, 40), background)
    for z in planes:
        image[z][disc] = value
    return image, disc


def _settings(**kwargs):
    return PropagationSettings(box_margin=0.0, **kwargs)


def _written(steps):
    return sorted(s.plane[0] for s in steps if s.mask is not None)


def test_an_object_that_ends_stops_on_the_first_plane_past_its_end():
    image, disc = _disc_stack()
    start = PlaneMask.from_full(disc)
    old = _settings(min_contrast=None)
    assert _written(propagate(BoxFiller(image), 8, start, settings=old)) == [p for p in range(20) if p != 8]
    steps = list(propagate(BoxFiller(image), 8, start, settings=_settings()))
    assert _written(steps) == [5, 6, 7, 9, 10, 11, 12]
    ends = [s for s in steps if s.stopped]
    assert [s.plane[0] for s in ends] == [13, 4] and all(s.mask is None for s in ends)
    assert all("contrast 0.00 of the start's < 0.5" in s.stopped for s in ends)
    kept = [s.contrast for s in steps if s.mask is not None]
    assert all(0.5 < c <= 1.0 for c in kept)  # the box's corners dim it below the disc's own


def test_a_faint_tip_stops_where_it_falls_below_the_threshold():
    image, disc = _disc_stack(planes=range(3, 17))
    image[13:17][:, disc] = 10 + 60  # the tip: a third of the start's contrast
    steps = list(propagate(BoxFiller(image), 8, PlaneMask.from_full(disc), directions=(1,), settings=_settings()))
    assert _written(steps) == [9, 10, 11, 12] and steps[-1].plane == (13,)
    steps = list(propagate(BoxFiller(image), 8, PlaneMask.from_full(disc), directions=(1,),
                           settings=_settings(min_contrast=0.2)))
    assert _written(steps) == list(range(9, 17)) and steps[-1].plane == (17,)


def test_an_object_without_contrast_on_its_start_plane_is_not_stopped_by_it():
    image = np.full((6, 30, 30), 50.0)
    start = PlaneMask((5, 15, 5, 15), np.ones((10, 10), bool), 1.0, ())
    steps = list(propagate(BoxFiller(image), 2, start, settings=_settings()))
    assert _written(steps) == [0, 1, 3, 4, 5] and all(s.contrast is None and not s.stopped for s in steps)


def test_contrast_measures_inside_against_the_ring():
    image = np.zeros((1, 20, 20))
    image[0, 5:10, 5:10] = 10.0
    image[0, 5:10, 10:12] = 4.0  # inside the ring of width 2 on the right only
    c, scale = contrast(ImageSource(image, "ZYX"), 0, PlaneMask((5, 10, 5, 10), np.ones((5, 5), bool), 1.0, ()), 2)
    ring = np.zeros((20, 20), bool)
    ring[3:12, 3:12] = True
    ring[5:10, 5:10] = False
    ring[3, 3] = ring[3, 11] = ring[11, 3] = ring[11, 11] = False  # the diamond's corners
    ring[3, 4] = ring[4, 3] = ring[3, 10] = ring[4, 11] = ring[10, 3] = ring[11, 4] = False
    ring[10, 11] = ring[11, 10] = False
    assert c == pytest.approx(10.0 - image[0][ring].mean()) and scale == 10.0
    rgb = np.repeat(image[..., None], 3, axis=-1)
    c_rgb, _ = contrast(ImageSource(rgb, "ZYXC"), 0, PlaneMask((5, 10, 5, 10), np.ones((5, 5), bool), 1.0, ()), 2)
    assert c_rgb == pytest.approx(c)


@pytest.mark.parametrize("kwargs, message", [
    (dict(box_margin=-0.5), "box_margin must be above -0.5"),
    (dict(min_contrast=1.5), "min_contrast is a fraction"),
    (dict(contrast_ring=0), "contrast_ring must be at least 1"),
    (dict(use_box=False), "needs a box or points"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PropagationSettings(**kwargs)


def test_defaults_prompt_with_a_box_shrunk_by_a_tenth_alone():
    seen = []
    image, disc = _disc_stack()
    emb = BoxFiller(image)
    inner = emb.segment

    def spy(plane, prompt, multimask=None, max_tiles=16, refine=True):
        seen.append(prompt)
        return inner(plane, prompt, multimask, max_tiles, refine)

    emb.segment = spy
    list(propagate(emb, 8, PlaneMask.from_full(disc), directions=(1,), settings=PropagationSettings(max_planes=1)))
    rows, cols = np.flatnonzero(disc.any(1)), np.flatnonzero(disc.any(0))
    assert len(seen[0].points) == 0 and seen[0].previous is None
    w = cols[-1] + 1 - cols[0]  # the disc is as tall as wide
    assert seen[0].box == pytest.approx([cols[0] + 0.1 * w, rows[0] + 0.1 * w, cols[-1] + 1 - 0.1 * w,
                                         rows[-1] + 1 - 0.1 * w])


