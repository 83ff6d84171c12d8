"""Measuring segmentation quality against instance ground truth.

Three measurements, each returning a JSON-able dict (``"kind"`` says which) that
:func:`format_table` turns into a markdown table:

* **Prompted** (:func:`evaluate_prompted`, :mod:`~napari_sam.evaluate.prompted`): every
  ground-truth object is prompted with a point, its box and corrective points, with SAM
  or with the classical :class:`WatershedBaseline`; mean IoU per prompt type.
* **Automatic** (:func:`evaluate_automatic`, :mod:`~napari_sam.evaluate.automatic`): a
  label image per image from any segmenter (e.g. :func:`grid_segmenter`), scored by the
  mean segmentation accuracy and the accuracy at IoU 0.5 and 0.75
  (:mod:`~napari_sam.evaluate.metrics` defines them), with the time per plane;
  :func:`evaluate_modes` measures every automatic mode a model offers, with its
  recommended settings, beside the classical baseline (:func:`watershed_instances`).
* **Propagation** (:func:`evaluate_propagation`, :mod:`~napari_sam.evaluate.propagation`):
  a callable that spreads a mask from one plane through a volume, started from each
  object's ground-truth mask on its middle plane; mean 3D IoU.

Image/label pairs come from folders, a Zarr group or arrays (:func:`load_pairs`,
:mod:`~napari_sam.evaluate.data`).

The names below are imported on first use, so that importing this package loads
neither torch nor scikit-image.

>>> from napari_sam.evaluate import evaluate_prompted, WatershedBaseline   # doctest: +SKIP
"""

from __future__ import annotations

from .._lazy import lazy_names

_LAZY = {
    "EvalPair": "data",
    "load_pairs": "data",
    "pairs_from_arrays": "data",
    "EvalProgress": "progress",
    "THRESHOLDS": "metrics",
    "instance_scores": "metrics",
    "mean_segmentation_accuracy": "metrics",
    "segmentation_accuracy": "metrics",
    "evaluate_prompted": "prompted",
    "iter_evaluate_prompted": "prompted",
    "evaluate_automatic": "automatic",
    "grid_segmenter": "automatic",
    "iter_evaluate_automatic": "automatic",
    "evaluate_modes": "automatic",
    "iter_evaluate_modes": "automatic",
    "select_modes": "automatic",
    "watershed_segmenter": "automatic",
    "evaluate_propagation": "propagation",
    "evaluate_propagation_volumes": "propagation",
    "sam_propagator": "propagation",
    "sam2_propagator": "propagation",
    "watershed_propagator": "propagation",
    "format_table": "report",
    "WatershedBaseline": "baseline",
    "watershed_segment": "baseline",
    "watershed_instances": "baseline",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
