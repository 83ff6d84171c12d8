"""A whole training run in one call, as scripts and the command line start it: load the
model and the data, train with a progress bar, save.
"""

from __future__ import annotations

import torch

from ..model import Sam
from ..model.checkpoint import PathLike
from .config import TrainingConfig
from .dataset import SegmentationDataset
from .trainer import Trainer

__all__ = ["train"]


def train(
    model: Sam | PathLike,
    train_data: SegmentationDataset | PathLike,
    config: TrainingConfig | None = None,
    validation_data: SegmentationDataset | PathLike | None = None,
    checkpoint: PathLike | None = None,
    save_every: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Trainer:
    """Train with a tqdm progress bar and save the result.

    Parameters
    ----------
    model
        A :class:`Sam`, or a registry name or checkpoint path for
        :func:`~napari_sam.core.models.load_model`.
    train_data, validation_data
        Datasets, or folders for :meth:`SegmentationDataset.from_folder`.
    config
        Settings (:class:`TrainingConfig`).
    checkpoint
        Where to save the trained model (also every ``save_every`` steps); None: not saved.
    save_every
        Steps between intermediate saves; 0 only at the end.
    device
        Where to train.
    progress
        Show the progress bar.

    Returns
    -------
    Trainer
        After the last step, with its ``history``.
    """
    from tqdm.auto import tqdm

    from ..core.models import load_model

    if not isinstance(model, Sam):
        model = load_model(model, device=device, dtype="float32")
    if not isinstance(train_data, SegmentationDataset):
        train_data = SegmentationDataset.from_folder(train_data)
    if validation_data is not None and not isinstance(validation_data, SegmentationDataset):
        validation_data = SegmentationDataset.from_folder(validation_data)
    trainer = Trainer(model, train_data, config, validation_data, device)
    with tqdm(total=trainer.config.steps, initial=trainer.step, disable=not progress, desc="training") as bar:
        for record in trainer.run():
            bar.update(1)
            post = {"loss": f"{record.loss:.4f}", "lr": f"{record.learning_rate:.2e}"}
            if record.validation_iou is not None:
                post["val_iou"] = f"{record.validation_iou:.3f}"
            bar.set_postfix(post)
            if checkpoint is not None and save_every and record.step % save_every == 0:
                trainer.save(checkpoint)
    if checkpoint is not None:
        trainer.save(checkpoint)
    return trainer
