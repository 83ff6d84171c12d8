"""Detached specks of a prompted mask are dropped; pieces the user clicked or that are
large stay."""

import numpy as np

from napari_sam.core.masks import PlaneMask, drop_fragments
from napari_sam.core.prompts import Prompt
from napari_sam.core.tiled_segmentation import segment_tiled
from napari_sam.core.tiling import TileGrid


def _mask():
    mask = np.zeros((60, 80), bool)
    mask[10:40, 10:40] = True  # the object: 900 pixels
    mask[50:53, 60:62] = True  # a speck: 6 pixels
    mask[5:20, 55:75] = True  # a second large part: 300 pixels
    return mask


def test_specks_go_and_large_or_clicked_pieces_stay():
    mask = _mask()
    kept = drop_fragments(mask, [[20.0, 20.0]], [1])
    assert kept.sum() == 1200 and not kept[50:53, 60:62].any() and kept[5:20, 55:75].all()
    # a foreground click on the speck keeps it; a background click there does not
    assert drop_fragments(mask, [[20.0, 20.0], [60.0, 51.0]], [1, 1]).sum() == 1206
    assert drop_fragments(mask, [[20.0, 20.0], [60.0, 51.0]], [1, 0]).sum() == 1200
    # no points (a box): the largest piece decides what is small
    assert drop_fragments(mask).sum() == 1200
    # with a higher bar the second part goes too, unless it is clicked
    assert drop_fragments(mask, [[20.0, 20.0]], None, min_fraction=0.5).sum() == 900
    assert drop_fragments(mask, [[20.0, 20.0], [60.0, 10.0]], None, min_fraction=0.5).sum() == 1200
    # a click on a small piece keeps the largest too; one piece, or none, comes back as it is
    assert drop_fragments(mask, [[60.0, 51.0]]).sum() == 1206
    single = np.zeros((5, 5), bool)
    single[1:3, 1:3] = True
    assert drop_fragments(single, [[0.0, 0.0]]) is single
    assert drop_fragments(np.zeros((4, 4), bool)).sum() == 0
    # diagonal neighbours are one piece (8-connected)
    diagonal = np.zeros((20, 20), bool)
    diagonal[0:10, 0:10] = True
    diagonal[10, 10] = True
    assert drop_fragments(diagonal).sum() == 101


def test_a_tiled_answer_loses_its_specks():
    mask = _mask()
    grid = TileGrid(mask.shape, 200, 0)  # one tile: the answer is the whole mask

    def answer(tile, pts, lbl, box, multimask, mask_input=None):
        return mask[None], np.array([0.9])

    found = segment_tiled(grid, answer, Prompt.make(points=[[20.0, 20.0]]), multimask=False)
    full = found.to_full(mask.shape)
    assert full.sum() == 1200 and not full[50:53, 60:62].any()
    assert found.region == (5, 40, 10, 75)  # shrunk to what is left
    assert isinstance(found, PlaneMask) and found.iou == 0.9
    # a click on the speck keeps it: the click is placed in the answer's own region
    both = segment_tiled(grid, answer, Prompt.make(points=[[20.0, 20.0], [60.5, 51.0]]), multimask=False)
    full = both.to_full(mask.shape)
    assert full.sum() == 1206 and full[50:53, 60:62].all() and both.region == (5, 53, 10, 75)
