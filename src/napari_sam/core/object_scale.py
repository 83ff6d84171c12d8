"""A box-prompted object answered at its own scale.

A plane is embedded at one magnification (:mod:`napari_sam.core.scale`), chosen so that
its median object is the size the model segments best. On a plane of mixed sizes the
small and the large objects are then far from that size. A box tells its object's size
before anything is answered (the geometric mean of its sides), so a model that records
``"box_diameter"`` in its scale advice has a fresh box answered at the magnification
that shows its object ``box_diameter`` model-input pixels across. The tiles of that
magnification are embedded when first asked for and cached beside the plane's own
(:meth:`~napari_sam.core.embeddings.Embeddings.at_magnification`); a correction of the
answer is answered there too, where its logits were made
(:meth:`~napari_sam.core.embeddings.Embeddings.segment`).

Clicks stay at the plane's magnification: their object's size is known only from a
first answer, and answering again at the scale that answer asks for lost on H&E tiles
the default model never saw (docs/default_model.md, "Each box at its own scale").
Where the user gave the magnification, or the model has no such advice (SAM's and
micro-sam's weights), the plane's magnification answers everything, as before.
"""

from __future__ import annotations

import math

from .masks import PlaneMask
from .prompts import Prompt
from .scale import model_scale, nearest_magnification

__all__ = ["object_magnification", "segment_at_object_scale"]


def object_magnification(diameter: float, wanted: float) -> float:
    """The magnification (of :data:`~napari_sam.core.scale.MAGNIFICATIONS`) that shows an
    object ``diameter`` plane pixels across as about ``wanted`` model-input pixels."""
    return nearest_magnification(wanted / max(float(diameter), 1.0))


def segment_at_object_scale(embeddings, plane, prompt: Prompt, multimask: bool | None = None,
                            refine: bool = True) -> PlaneMask:
    """:meth:`Embeddings.segment <napari_sam.core.embeddings.Embeddings.segment>`, a fresh
    box answered at its object's own scale where the model advises one.

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
        The object's mask; its ``magnification`` is the one that answered.
    """
    wanted = model_scale(embeddings.model).get("box_diameter")
    if wanted is None or prompt.box is None or prompt.previous is not None or not embeddings.magnification_advised:
        return embeddings.segment(plane, prompt, multimask, refine=refine)
    x0, y0, x1, y1 = (float(v) for v in prompt.box)
    at = object_magnification(math.sqrt(max(x1 - x0, 1.0) * max(y1 - y0, 1.0)), wanted)
    return embeddings.at_magnification(at).segment(plane, prompt, multimask, refine=refine)
