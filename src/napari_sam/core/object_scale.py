"""A prompted object answered at its own scale.

A plane is embedded at one magnification (:mod:`napari_sam.core.scale`), chosen so that
its median object is the size the model segments best. On a plane of mixed sizes the
small and the large objects are then far from that size. A model that records
``"box_diameter"`` in its scale advice has each object answered, as soon as its size is
known, at the magnification that shows it ``box_diameter`` model-input pixels across
(the geometric mean of its box's sides):

* a fresh box says its size before anything is answered, so it is answered there;
* a fresh click is answered at the plane's magnification: its object's size is known
  only from that answer (answering a lone click again at the scale its answer asks for
  lost on H&E tiles the default model never saw, and keeping whichever of the two
  answers the model rates higher gained nothing on held-out nuclei);
* a correction of an answer made at the plane's magnification moves the object to the
  magnification that answer's box asks for, with the answer's logits carried into that
  frame as the mask prompt (:func:`~napari_sam.core.tiled_segmentation.carry_answer`),
  so that SAM's interactive loop goes on there;
* any other correction is answered where its logits were made
  (:meth:`~napari_sam.core.embeddings.Embeddings.segment`).

The tiles of another magnification are embedded when first asked for and cached beside
the plane's own (:meth:`~napari_sam.core.embeddings.Embeddings.at_magnification`). Where
the user gave the magnification, or the model has no such advice (SAM's and micro-sam's
weights), the plane's magnification answers everything. So it does on a plane embedded
as one tile: that tile is resized to fill the model input, so the plane is already shown
at least as enlarged as any magnification that keeps it whole (a 100-pixel plane fills a
256-pixel input up to 2.5x), and the next one cuts it into small tiles (four of 61
pixels at 3x), which lost on the GoNuclear planes. The measurements behind each
rule are in docs/default_model.md ("Each box at its own scale" and "Clicks and
corrections at their object's scale").
"""

from __future__ import annotations

import dataclasses
import math

from .masks import PlaneMask
from .prompts import Prompt
from .scale import model_scale, nearest_magnification
from .tiled_segmentation import carry_answer

__all__ = ["answers_per_object", "object_magnification", "segment_at_object_scale"]


def answers_per_object(model) -> bool:
    """Whether the model's advice has its prompted objects answered at their own scale
    (a ``"box_diameter"`` in its scale advice), where the magnification is its choice."""
    return model_scale(model).get("box_diameter") is not None


def object_magnification(diameter: float, wanted: float) -> float:
    """The magnification (of :data:`~napari_sam.core.scale.MAGNIFICATIONS`) that shows an
    object ``diameter`` plane pixels across as about ``wanted`` model-input pixels."""
    return nearest_magnification(wanted / max(float(diameter), 1.0))


def segment_at_object_scale(embeddings, plane, prompt: Prompt, multimask: bool | None = None,
                            refine: bool = True) -> PlaneMask:
    """:meth:`Embeddings.segment <napari_sam.core.embeddings.Embeddings.segment>`, the
    object answered at its own scale where the model advises one (the module's rules).

    Parameters
    ----------
    embeddings
        The plane's :class:`~napari_sam.core.embeddings.Embeddings`; its
        ``magnification_advised`` says whether the model chose the magnification.
    plane
        Flat plane number or (t, z) tuple.
    prompt
        Points (x, y), labels, box (x0, y0, x1, y1) in plane pixels, and the earlier answer
        it corrects.
    multimask, refine
        As for ``Embeddings.segment``.

    Returns
    -------
    PlaneMask
        The object's mask; its ``magnification`` is the one that answered (the frame of
        its logits, where the next correction goes).
    """
    if not answers_per_object(embeddings.model) or not embeddings.magnification_advised or len(embeddings.grid) == 1:
        return embeddings.segment(plane, prompt, multimask, refine=refine)
    wanted = float(model_scale(embeddings.model)["box_diameter"])
    previous = prompt.previous
    if previous is None and prompt.box is not None:
        x0, y0, x1, y1 = (float(v) for v in prompt.box)
    elif (previous is not None and prompt.box is None and previous.magnification == embeddings.magnification
          and previous.area):
        y0, y1, x0, x1 = (float(v) for v in previous.region)
    else:
        return embeddings.segment(plane, prompt, multimask, refine=refine)
    at = object_magnification(math.sqrt(max(x1 - x0, 1.0) * max(y1 - y0, 1.0)), wanted)
    if at == embeddings.magnification:
        return embeddings.segment(plane, prompt, multimask, refine=refine)
    there = embeddings.at_magnification(at)
    if previous is not None:
        moved = carry_answer(previous, embeddings.grid, there.grid, prompt, embeddings.model.config.image_size, at)
        prompt = dataclasses.replace(prompt, previous=moved)
    return there.segment(plane, prompt, multimask, refine=refine)
