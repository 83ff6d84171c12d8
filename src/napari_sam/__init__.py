"""napari-sam-scale: Segment Anything for scientific imaging.

The package is layered: :mod:`napari_sam.model` (torch only) holds SAM itself,
:mod:`napari_sam.core` the headless machinery (preprocessing, prediction, loading, I/O),
:mod:`napari_sam.cli` the command line, and the napari plugin sits on top.

The names below are imported on first use, so ``import napari_sam`` loads neither torch
nor Qt (napari imports every plugin's package when it reads manifests).

>>> from napari_sam import load_model, Predictor     # doctest: +SKIP
"""

from ._lazy import lazy_names

__version__ = "0.1.0"

_LAZY = {
    "Annotator": "napari_sam.api",
    "load_model": "napari_sam.core.models",
    "Predictor": "napari_sam.core.predictor",
    "ImageEmbedding": "napari_sam.core.image_embedding",
    "Prediction": "napari_sam.core.predictor",
    "Normalization": "napari_sam.core.preprocess",
    "Embeddings": "napari_sam.core.embeddings",
    "ImageSource": "napari_sam.core.image_source",
    "PlaneMask": "napari_sam.core.masks",
    "Prompt": "napari_sam.core.prompts",
    "list_models": "napari_sam.weights",
    "fetch_checkpoint": "napari_sam.weights",
}

__all__ = ["__version__", *_LAZY]

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
