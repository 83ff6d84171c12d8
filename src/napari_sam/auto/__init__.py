"""Automatic instance segmentation of a plane, and linking of plane instances into 3D.

Ways to segment every object of a plane without clicking:

* **Grid mode** (:func:`iter_grid`, :func:`segment_grid`; :mod:`~napari_sam.auto.grid`),
  SAM's "segment everything": a regular grid of single-point prompts, each giving three
  candidate masks, filtered by predicted IoU and stability, deduplicated by box
  non-maximum suppression and cleaned (:mod:`~napari_sam.auto.candidates`).
* **Detector-prompted mode** (:func:`iter_from_boxes`, :func:`segment_detections`;
  :mod:`~napari_sam.auto.boxes`): boxes from a classical detector (:func:`detect_boxes`:
  Otsu threshold and connected components, or Laplacian-of-Gaussian blobs), from a label
  image (:func:`boxes_from_labels`) or given by hand; each box becomes one object
  through SAM.
* **AIS** (:func:`iter_ais`, :func:`segment_ais`; :mod:`~napari_sam.auto.ais`),
  micro-sam's automatic instance segmentation: a model's instance decoder predicts
  foreground and centre/boundary distances from the cached embeddings, tile by tile
  (:mod:`~napari_sam.auto.instance_maps`), and a seeded watershed on the stitched maps
  gives every object at once (:func:`instances_from_maps`); ``augment=True`` averages the
  maps of the plane seen enlarged and mirrored first (:class:`Augmentation`,
  :mod:`~napari_sam.auto.augmentation`: slower, better on small touching objects).
* **APG** (:func:`iter_apg`, :func:`segment_apg`; :mod:`~napari_sam.auto.apg`),
  micro-sam's automatic prompt generation: objects found in the instance decoder's maps
  become point prompts for SAM, and SAM's masks, filtered, are the objects.
* **3D** (:func:`link_planes`, :mod:`~napari_sam.auto.link`): instances of consecutive
  planes are matched by overlap (Hungarian assignment on IoU) and given one id per 3D
  object; :func:`segment_grid_volume` does both.

:func:`recommended` (:mod:`~napari_sam.auto.recommend`) reads which mode and filters suit
a model from its checkpoint; :func:`segment_plane` and :func:`segment_volume`
(:mod:`~napari_sam.auto.modes`) run any mode by name (:data:`MODES`,
:func:`available_modes`), with the model's advice as defaults.

Long work is written as generators that yield :class:`Progress` and *return* their result
(``StopIteration.value``); :func:`run` drives one to the end, and the ``segment_*``
functions are the one-call versions (:mod:`~napari_sam.auto.results`).

Coordinates: prompts are (x, y) = (column, row) pixels, boxes (x0, y0, x1, y1); label
images and the internal mask regions are (row, col) arrays.

The names below are imported on first use, so that importing this package loads
neither torch nor scikit-image.

>>> from napari_sam.auto import segment_grid, GridConfig   # doctest: +SKIP
"""

from __future__ import annotations

from .._lazy import lazy_names

_LAZY = {
    "AutomaticResult": "results",
    "Progress": "results",
    "run": "results",
    "box_nms": "candidates",
    "clean_mask": "candidates",
    "masks_to_labels": "candidates",
    "stability_score": "candidates",
    "GridConfig": "grid",
    "grid_points": "grid",
    "iter_grid": "grid",
    "iter_grid_volume": "grid",
    "segment_grid": "grid",
    "segment_grid_volume": "grid",
    "boxes_from_labels": "boxes",
    "detect_boxes": "boxes",
    "iter_from_boxes": "boxes",
    "segment_detections": "boxes",
    "link_planes": "link",
    "AISSettings": "ais",
    "instances_from_maps": "ais",
    "iter_ais": "ais",
    "iter_ais_volume": "ais",
    "segment_ais": "ais",
    "segment_ais_volume": "ais",
    "Augmentation": "augmentation",
    "iter_augmented_maps": "augmentation",
    "iter_instance_maps": "instance_maps",
    "APGSettings": "apg",
    "iter_apg": "apg",
    "segment_apg": "apg",
    "MODES": "modes",
    "available_modes": "modes",
    "iter_segment_plane": "modes",
    "iter_segment_volume": "modes",
    "segment_plane": "modes",
    "segment_volume": "modes",
    "Recommended": "recommend",
    "recommended": "recommend",
}

__all__ = [
    "AISSettings",
    "APGSettings",
    "Augmentation",
    "AutomaticResult",
    "GridConfig",
    "MODES",
    "Progress",
    "Recommended",
    "box_nms",
    "boxes_from_labels",
    "clean_mask",
    "available_modes",
    "detect_boxes",
    "grid_points",
    "instances_from_maps",
    "iter_ais",
    "iter_ais_volume",
    "iter_apg",
    "iter_augmented_maps",
    "iter_from_boxes",
    "iter_grid",
    "iter_grid_volume",
    "iter_instance_maps",
    "iter_segment_plane",
    "iter_segment_volume",
    "link_planes",
    "masks_to_labels",
    "recommended",
    "run",
    "segment_ais",
    "segment_ais_volume",
    "segment_apg",
    "segment_detections",
    "segment_grid",
    "segment_grid_volume",
    "segment_plane",
    "segment_volume",
    "stability_score",
]

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
