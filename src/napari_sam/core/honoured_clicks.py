"""A correction's answer that honours its clicks.

A corrective click says where the last answer was wrong: a positive click on object the
mask missed, a negative one on background it took. SAM answers a correction with its
single-mask output and the last answer's logits as the mask prompt, and that answer
often leaves a click on the wrong side: with the default model, half of the corrections
on the 16 DSB training images. Most of those clicks lie within one cell of the low-res
mask (4 model-input pixels) of its edge, a detail no mask of the model draws; those
count as honoured (:data:`CLOSE_ENOUGH`).

Where a click is further off, the decoder is asked again for its three masks (the same
clicks, the same mask prompt), and the one with the highest predicted IoU among those
that put every click on its side is shown instead; where none does, the single mask
stays. Without the tolerance the rule chose masks that honoured a sliver along the edge
and lost the rest; asking also without the mask prompt cost two more decodes and gained
nothing overall. The measurements are in docs/default_model.md ("Corrections that honour
their clicks").
"""

from __future__ import annotations

import numpy as np

__all__ = ["CLOSE_ENOUGH", "honouring_choice", "honours", "most_likely_honouring"]

CLOSE_ENOUGH = 1.0
"""How near (in cells of the model's low-res mask) the single mask's edge may come to a
click it leaves on the wrong side for that click to count as honoured: a mask cell is 4
model-input pixels, so a click that close to the edge asks for a detail the mask cannot
draw, and asking again there chose worse masks."""

def honours(mask, points, labels, within: float = 0.0) -> bool:
    """Whether a mask puts every positive click inside it and every negative one outside,
    or, with ``within``, has a pixel on the click's side that close to each click.

    Parameters
    ----------
    mask
        (H, W) bool.
    points
        (N, 2) ``(x, y)`` in the mask's pixels; rounded to the nearest pixel and clipped
        to the mask.
    labels
        (N,) 1 foreground, 0 background; other labels (SAM's padding, -1) are ignored.
    within
        Distance in the mask's pixels: a positive click counts as honoured where a mask
        pixel lies that close to it, a negative one where a background pixel does.
    """
    mask = np.asarray(mask, bool)
    points, labels = np.asarray(points, np.float64).reshape(-1, 2), np.asarray(labels).reshape(-1)
    used = (labels == 0) | (labels == 1)
    h, w = mask.shape
    xs = np.clip(np.round(points[used, 0]).astype(int), 0, w - 1)
    ys = np.clip(np.round(points[used, 1]).astype(int), 0, h - 1)
    wanted = labels[used] == 1
    exact = np.array_equal(mask[ys, xs], wanted)
    if exact or within <= 0:
        return bool(exact)
    r = int(np.floor(within))
    for x, y, positive in zip(xs, ys, wanted):
        y0, y1, x0, x1 = max(y - r, 0), min(y + r + 1, h), max(x - r, 0), min(x + r + 1, w)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        near = (yy - y) ** 2 + (xx - x) ** 2 <= within**2
        if not (mask[y0:y1, x0:x1][near] == positive).any():
            return False
    return True


def most_likely_honouring(masks, predicted, points, labels) -> int | None:
    """Of candidate masks, the one with the highest predicted IoU among those that honour
    every click (:func:`honours`), or None when none does.

    Parameters
    ----------
    masks
        Candidates: any sequence whose ``masks[k]`` is an (H, W) bool mask.
    predicted
        (C,) their predicted IoU.
    points, labels
        As for :func:`honours`.
    """
    order = np.argsort(-np.asarray(predicted, np.float64).reshape(-1), kind="stable")
    return next((int(k) for k in order if honours(masks[int(k)], points, labels)), None)


def honouring_choice(single, ask, points, labels, cell: float) -> tuple | None:
    """What answers a correction: None to keep its single mask, else the most likely of
    the model's three masks for the same prompts that honours every click.

    Parameters
    ----------
    single
        (H, W) bool: the single mask the correction was answered with.
    ask
        ``ask() -> (masks, predicted)``: the same clicks and mask prompt answered again
        with three masks, as for :func:`most_likely_honouring`; called only where the
        single mask leaves a click on the wrong side.
    points, labels
        The correction's clicks, as for :func:`honours`, in the masks' pixels.
    cell
        The side of one cell of the model's low-res mask in the masks' pixels (the
        longest side of the region the model saw over the low-res mask's side): the
        single mask keeps clicks within :data:`CLOSE_ENOUGH` cells of its edge.

    Returns
    -------
    tuple or None
        ``(masks, k, predicted IoU)``: the three masks and the index of the chosen one;
        None where the single mask honours every click or no other mask does.
    """
    if honours(single, points, labels, within=CLOSE_ENOUGH * cell):
        return None
    masks, predicted = ask()
    predicted = np.asarray(predicted, np.float64).reshape(-1)
    k = most_likely_honouring(masks, predicted, points, labels)
    return None if k is None else (masks, k, float(predicted[k]))
