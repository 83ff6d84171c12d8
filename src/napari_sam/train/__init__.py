"""Fine-tuning SAM on instance-labelled microscopy planes.

Training follows SAM's interactive recipe (Kirillov et al. 2023, appendix A): for several
objects of an image, a first prompt is simulated from the ground truth, the decoder
answers, and a few corrective iterations follow (:mod:`~napari_sam.train.session`);
masks are supervised with focal and dice loss, the IoU head with the squared error to
each mask's actual IoU (:mod:`~napari_sam.train.losses`).

Two modes:

``"decoder"``
    Only the prompt encoder and mask decoder learn. The image encoder is frozen, so each
    image is embedded once and its embedding kept in memory: cheap enough for a CPU.
``"full"``
    The whole model learns (optionally with the first K encoder blocks frozen); every
    step runs the encoder. Needs a GPU in practice.

The modules, one idea each:

* :mod:`~napari_sam.train.dataset`: the (image, labels) planes (:class:`SegmentationDataset`);
* :mod:`~napari_sam.train.config`: the settings and learning-rate schedule
  (:class:`TrainingConfig`);
* :mod:`~napari_sam.train.frames`: plane pixels in the model's input and low-res frames;
* :mod:`~napari_sam.train.session`: the simulated interactive session and its loss;
* :mod:`~napari_sam.train.features`: the image embeddings, cached when the encoder is frozen;
* :mod:`~napari_sam.train.parameters`: what learns, and the AdamW groups;
* :mod:`~napari_sam.train.validation`: single-prompt IoU on validation planes;
* :mod:`~napari_sam.train.trainer`: the steps (:class:`Trainer`, :class:`TrainingRecord`);
* :mod:`~napari_sam.train.checkpoints`: saving, provenance and resuming;
* :mod:`~napari_sam.train.run`: :func:`train`, a whole run with a progress bar;
* :mod:`~napari_sam.train.instance_targets` and :mod:`~napari_sam.train.instance_decoder`:
  an instance decoder for AIS (micro-sam's), trained on the frozen model's embeddings
  (:func:`iter_train_instance_decoder`) and stored beside SAM
  (:func:`save_with_instance_decoder`);
* :mod:`~napari_sam.train.instance_decoder_run`: a model given a new instance decoder from
  a user's labelled planes, as the command line and the training widget do it
  (:class:`InstanceDecoderRun`);
* :mod:`~napari_sam.train.image_refiner`: an image refiner for that decoder, trained on
  crops with both frozen (:func:`iter_train_image_refiner`).

Checkpoints are written in the official key format with the configuration and the
training provenance as metadata (:func:`napari_sam.core.models.load_model` reads them),
optimizer state beside them.

The names below are imported on first use, so that importing this package loads
neither torch nor the data readers.

>>> from napari_sam.train import SegmentationDataset, Trainer, TrainingConfig   # doctest: +SKIP
"""

from __future__ import annotations

from .._lazy import lazy_names

_LAZY = {
    "TrainingPair": "dataset",
    "SegmentationDataset": "dataset",
    "object_ids": "dataset",
    "MODES": "config",
    "SCHEDULES": "config",
    "TrainingConfig": "config",
    "low_res_targets": "frames",
    "LossParts": "session",
    "Trainer": "trainer",
    "TrainingRecord": "trainer",
    "CHECKPOINT_FORMAT": "checkpoints",
    "optimizer_state_path": "checkpoints",
    "train": "run",
    "export_bioimageio": "bioimageio",
    "validate_bioimageio": "bioimageio",
    "import_bioimageio": "bioimageio_import",
    "DecoderTrainingConfig": "instance_decoder",
    "DecoderTrainingProgress": "instance_decoder",
    "iter_train_instance_decoder": "instance_decoder",
    "InstanceDecoderRun": "instance_decoder_run",
    "RefinerTrainingConfig": "image_refiner",
    "iter_train_image_refiner": "image_refiner",
    "save_with_instance_decoder": "instance_decoder",
    "instance_targets": "instance_targets",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
