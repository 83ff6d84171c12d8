"""A correction whose single mask ignores a click is answered by a mask that honours them all."""

import numpy as np

from napari_sam.core.honoured_clicks import honours, most_likely_honouring
from napari_sam.core.prompts import Prompt
from napari_sam.core.tiled_segmentation import segment_tiled
from napari_sam.core.tiling import TileGrid


def _square(y0, y1, x0, x1, shape=(250, 250)):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_honours_reads_each_click_on_its_side():
    mask = _square(10, 20, 10, 20, (40, 40))
    assert honours(mask, [[15, 15], [30, 30]], [1, 0])
    assert not honours(mask, [[15, 15], [30, 30]], [1, 1])  # a positive click left outside
    assert not honours(mask, [[15, 15], [12, 12]], [1, 0])  # a negative click left inside
    assert honours(mask, [[15, 15], [12, 12]], [1, -1])  # SAM's padding is not a click
    assert honours(mask, [[19.4, 15], [-5, 500]], [1, 0])  # rounded, clipped to the mask
    assert not honours(mask, [[19.6, 15]], [1])
    # within a distance: a positive click that close to the mask, a negative one that close
    # to its background
    assert honours(mask, [[22, 15]], [1], within=3) and not honours(mask, [[22, 15]], [1], within=2.9)
    assert honours(mask, [[15, 15]], [0], within=5) and not honours(mask, [[15, 15]], [0], within=4.9)
    assert honours(mask, [[15, 15], [0, 0]], [1, 0], within=1) and not honours(mask, [[0, 0]], [1], within=9)


def test_the_most_likely_honouring_mask_and_none_where_none_does():
    points, labels = [[15, 15], [30, 30]], [1, 0]
    inside, spilling = _square(10, 20, 10, 20, (40, 40)), _square(0, 40, 0, 40, (40, 40))
    missing = np.zeros((40, 40), bool)
    assert most_likely_honouring([spilling, inside, inside], [0.9, 0.5, 0.7], points, labels) == 2
    assert most_likely_honouring([spilling, missing], [0.9, 0.8], points, labels) is None


class _Answers:
    """A fake model: for each way a tile is asked (mask prompt or not, one mask or three),
    fixed candidates with their predicted IoU and logits that say which they are."""

    def __init__(self, table):
        self.table = table
        self.asked = []

    def __call__(self, tile, points, labels, box, multimask, mask_input=None):
        key = (mask_input is not None, bool(multimask))
        self.asked.append(key)
        masks, scores = self.table[key]
        answer = _WithLogits(masks, np.stack([np.full((64, 64), 10.0 * key[0] + 2.0 * key[1] + k)
                                              for k in range(len(masks))]))
        return answer, np.asarray(scores)


class _WithLogits(list):
    def __init__(self, masks, logits):
        super().__init__(masks)
        self.low_res_logits = logits


# Tile (1, 1) of a 600-pixel plane in 200-pixel tiles with 25-pixel halos starts at
# (175, 175): plane (320, 320) is tile pixel (145, 145).
_GRID = TileGrid((600, 600), tile=200, halo=25)
_OBJECT = _square(130, 160, 130, 160)  # holds the first click
_TOO_BIG = _square(120, 180, 120, 180)  # holds the negative click at tile (170, 170) too
_CORRECTED = _square(130, 165, 130, 165)  # the object, without the negative click


def _corrected(answers):
    first = segment_tiled(_GRID, answers, Prompt.make(points=[[320, 320]]))
    assert answers.asked == [(False, True)]
    answers.asked.clear()
    return segment_tiled(_GRID, answers, Prompt.make(points=[[320, 320], [345, 345]], labels=[1, 0],
                                                      previous=first))


def _plane(mask):
    out = np.zeros((600, 600), bool)
    out[175:425, 175:425] = mask
    return out


def test_a_correction_its_single_mask_ignores_is_answered_by_the_likeliest_mask_that_honours_it():
    answers = _Answers({
        (False, True): ([_OBJECT, _TOO_BIG, _TOO_BIG], [0.5, 0.9, 0.6]),  # the lone click
        (True, False): ([_TOO_BIG], [0.95]),  # the correction ignores its negative click
        (True, True): ([_TOO_BIG, _CORRECTED, _OBJECT], [0.9, 0.7, 0.6]),
    })
    answer = _corrected(answers)
    assert answers.asked == [(True, False), (True, True)]
    assert np.array_equal(answer.to_full((600, 600)), _plane(_CORRECTED))
    assert answer.iou == 0.7
    assert answer.logits.mean() == 10 + 2 + 1  # the chosen mask's logits: the next correction's mask prompt


def test_a_click_within_a_mask_cell_of_the_edge_keeps_the_single_mask():
    # 250-pixel tile, 64 x 64 logits: a cell is 3.9 plane pixels. The negative click at
    # tile (170, 170) lies 3 pixels inside this mask's corner edge: a detail the mask
    # cannot draw, so nothing is asked again.
    near = _square(130, 173, 130, 173)
    answers = _Answers({(False, True): ([_OBJECT] * 3, [0.5, 0.9, 0.6]), (True, False): ([near], [0.4])})
    answer = _corrected(answers)
    assert answers.asked == [(True, False)] and answer.iou == 0.4


def test_a_single_mask_that_honours_its_clicks_or_no_better_one_keeps_its_answer():
    honest = _Answers({(False, True): ([_OBJECT] * 3, [0.5, 0.9, 0.6]), (True, False): ([_CORRECTED], [0.4])})
    answer = _corrected(honest)
    assert honest.asked == [(True, False)]  # nothing asked again
    assert answer.iou == 0.4 and np.array_equal(answer.to_full((600, 600)), _plane(_CORRECTED))
    stubborn = _Answers({
        (False, True): ([_TOO_BIG] * 3, [0.5, 0.9, 0.6]),
        (True, False): ([_TOO_BIG], [0.3]),
        (True, True): ([_TOO_BIG] * 3, [0.9, 0.7, 0.6]),
    })
    answer = _corrected(stubborn)
    assert stubborn.asked == [(True, False), (True, True)]
    assert answer.iou == 0.3 and np.array_equal(answer.to_full((600, 600)), _plane(_TOO_BIG))
