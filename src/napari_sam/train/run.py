"""A whole training run in one call, as scripts and the command line start it: load the
model and the data, train with a progress bar, save.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..model import Sam
from ..model.checkpoint import PathLike
from .budget import TimeBudget
from .config import TrainingConfig
from .dataset import SegmentationDataset
from .trainer import Trainer, TrainingRecord

__all__ = ["SAVE_EVERY", "finish", "run_steps", "train"]

SAVE_EVERY = 100
"""Steps between the saves of a run in progress (the command line's and the training
widget's), so that a run killed outright keeps what it learned up to its last save."""


def train(
    model: Sam | PathLike | Trainer,
    train_data: SegmentationDataset | PathLike | None = None,
    config: TrainingConfig | None = None,
    validation_data: SegmentationDataset | PathLike | None = None,
    checkpoint: PathLike | None = None,
    save_every: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    minutes: float | None = None,
    keep_best: bool = True,
    stop_after: float | None = None,
    stop: Callable[[], bool] | None = None,
) -> Trainer:
    """Train with a tqdm progress bar and save the result.

    Parameters
    ----------
    model
        A :class:`Sam`, a registry name or checkpoint path for
        :func:`~napari_sam.core.models.load_model`, or a :class:`Trainer` to run (a resumed
        one, say; ``train_data``, ``config``, ``validation_data`` and ``device`` are then
        ignored).
    train_data, validation_data
        Datasets, or folders for :meth:`SegmentationDataset.from_folder`.
    config
        Settings (:class:`TrainingConfig`).
    checkpoint
        Where to save the trained model (also every ``save_every`` steps); None: not saved.
    save_every
        Steps between intermediate saves (the current weights, for resuming); 0 only at
        the end.
    device
        Where to train.
    progress
        Show the progress bar.
    minutes
        A time budget: the run is sized to end in about this many minutes
        (:func:`~napari_sam.train.budget.steps_for_minutes`) and stops when it is spent.
    keep_best
        End with the weights of the best validation (:meth:`Trainer.keep_best`).
    stop_after
        Minutes after which the run stops wherever its schedule is (a hard limit, without
        sizing the run as ``minutes`` does).
    stop
        Asked after each step; True ends the run there, as the clock does (the best
        weights are still kept and saved): the command line's first Ctrl-C.

    Returns
    -------
    Trainer
        After the last step, with its ``history``.
    """
    from ..core.models import load_model
    from ..core.progress_bar import progress_bar

    if isinstance(model, Trainer):
        trainer = model
    else:
        if train_data is None:
            raise ValueError("train_data is needed unless a Trainer is given")
        if not isinstance(model, Sam):
            model = load_model(model, device=device, dtype="float32")
        if not isinstance(train_data, SegmentationDataset):
            train_data = SegmentationDataset.from_folder(train_data)
        if validation_data is not None and not isinstance(validation_data, SegmentationDataset):
            validation_data = SegmentationDataset.from_folder(validation_data)
        trainer = Trainer(model, train_data, config, validation_data, device)

    def say_size(budget: TimeBudget) -> None:
        print(f"{minutes:g} minute(s) hold about {budget.steps - trainer.step} step(s) here; the schedule "
              "spans them (resized at each validation)")

    with progress_bar(total=trainer.config.steps, initial=trainer.step, progress=progress, desc="training") as bar:
        for record in run_steps(trainer, minutes, stop_after, on_sized=say_size if progress else None):
            bar.update(1)
            bar.total = trainer.config.steps  # a time budget resizes the run at each validation
            post = {"loss": f"{record.loss:.4f}", "lr": f"{record.learning_rate:.2e}"}
            if record.validation_iou is not None:
                post["val_iou"] = f"{record.validation_iou:.3f}"
            bar.set_postfix(post)
            if checkpoint is not None and save_every and record.step % save_every == 0:
                trainer.save(checkpoint)
            if stop is not None and stop():
                break
    kept = finish(trainer) if keep_best else trainer.step
    if checkpoint is not None:  # saved before anything is printed: a closed terminal takes no output
        trainer.save(checkpoint)
    if progress and kept != trainer.step and trainer.best is not None:
        print(f"kept the weights of step {kept} (best validation IoU {trainer.best[1]:.3f})")
    return trainer


def run_steps(trainer: Trainer, minutes: float | None = None, stop_after: float | None = None,
              max_steps: int | None = None,
              on_sized: Callable[[TimeBudget], object] | None = None) -> Iterator[TrainingRecord]:
    """The trainer's steps, each record as it comes, within a time budget: what
    :func:`train` and the training widget run.

    Parameters
    ----------
    trainer
        Run from where it stands.
    minutes
        The run is sized to end in about this many minutes
        (:class:`~napari_sam.train.budget.TimeBudget`: its schedule warms up and decays
        within them) and ends when they are spent.
    stop_after
        Minutes after which the run ends wherever its schedule is.
    max_steps
        With ``minutes``: the run never grows past this many steps.
    on_sized
        Called with the budget once the run is sized (measuring a step takes a moment).

    Yields
    ------
    TrainingRecord
        After each step; stopping the iteration ends the run there.
    """
    import time

    end = None if stop_after is None else time.monotonic() + 60 * stop_after
    budget = None
    if minutes is not None:
        budget = TimeBudget(trainer, minutes, max_steps)
        end = budget.end if end is None else min(end, budget.end)
        if on_sized is not None:
            on_sized(budget)
    for record in trainer.run():
        if record.validation_iou is not None and budget is not None:
            budget.resize(trainer)
        yield record
        if end is not None and time.monotonic() > end:
            return


def finish(trainer: Trainer) -> int:
    """End a run with the weights of its best validation (:meth:`Trainer.keep_best`); a
    run stopped between validations has its last weights validated first, so that they
    compete too. Returns the step whose weights are kept."""
    if trainer.validation_data is not None and trainer.best is not None and trainer.best[0] != trainer.step \
            and trainer.history and "validation_iou" not in trainer.history[-1]:
        trainer.validate_step()
    return trainer.keep_best()
