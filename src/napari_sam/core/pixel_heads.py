"""Which of a model's heads that read the pixels act on which planes.

SAM's masks come from the image embedding alone. The default model carries two small heads
that also read the model input, the tile's own pixels: the mask refiner
(:mod:`~napari_sam.model.mask_refiner`) sharpens a first answer's outline, and the mask
chooser (:mod:`~napari_sam.model.mask_chooser`) ranks a lone click's three masks. Each
was measured to help on some planes and not on others; the rules live here, so that the
predictor and the tiled embeddings keep the pixels exactly where a head will read them.
"""

from __future__ import annotations

from ..model.sam import Sam
from .stain import HAEMATOXYLIN

__all__ = ["chooses_masks", "reads_pixels", "refines_masks"]


def refines_masks(model: Sam, channel=None, magnification: float | None = None) -> bool:
    """Whether the answers on a plane read through ``channel`` and enlarged ``magnification``
    times for its embedding (the scale advice's, or more for a plane smaller than the model
    input) are sharpened by the model's mask refiner (:attr:`Sam.mask_refiner
    <napari_sam.model.sam.Sam.mask_refiner>`): when it has one, except on stained brightfield
    read as its haematoxylin stain (a refiner trained on fluorescence cost H&E nuclei
    0.07-0.09 IoU there) and on planes enlarged as much as its checkpoint's
    ``metadata["mask_refiner"]["refine_below_magnification"]`` or more, where a mask pixel
    covers two image pixels or fewer and the pixels it would read are interpolated
    (docs/default_model.md)."""
    if model.mask_refiner is None or channel == HAEMATOXYLIN:
        return False
    limit = (getattr(model, "metadata", None) or {}).get("mask_refiner", {}).get("refine_below_magnification")
    return limit is None or magnification is None or magnification < float(limit)


def chooses_masks(model: Sam, channel=None) -> bool:
    """Whether a lone click's three masks on a plane read through ``channel`` are ranked by
    the model's mask chooser (:mod:`~napari_sam.model.mask_chooser`, kept with its mask
    refiner) instead of its IoU head alone: when it has one, except on stained brightfield
    read as its haematoxylin stain, where the one unseen H&E set measured lost a little
    (docs/default_model.md, "A lone click's mask chosen by looking")."""
    refiner = model.mask_refiner
    return refiner is not None and refiner.chooser is not None and channel != HAEMATOXYLIN


def reads_pixels(model: Sam, channel=None, magnification: float | None = None) -> bool:
    """Whether answers on such a plane need its model input beside the embedding: for the
    mask refiner (:func:`refines_masks`) or the mask chooser (:func:`chooses_masks`)."""
    return refines_masks(model, channel, magnification) or chooses_masks(model, channel)
