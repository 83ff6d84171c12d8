"""Fitting a training run into a time budget.

"Train for ten minutes" should give a complete run: a learning-rate schedule that warms
up, decays and ends when the time does, with validations in between, rather than the
first minutes of a schedule sized for another number of steps (which stops while the
learning rate is still at its peak). :func:`steps_for_minutes` measures what a step and a
validation cost on this machine, without changing the model, and sizes the run;
:class:`TimeBudget` corrects the size as the run goes, since a step's cost on a shared
machine can change several-fold within minutes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import numpy as np

from .validation import VALIDATION_SEED

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["TimeBudget", "seconds_per_step", "steps_for_minutes"]


def seconds_per_step(trainer: Trainer, repeats: int = 3) -> float:
    """Wall time of one training step of ``trainer``, measured without changing its model.

    Runs ``repeats`` forward and backward passes on draws of their own (the run's draws
    are untouched) and discards the gradients. In ``"decoder"`` mode it embeds every
    plane first (:meth:`Trainer.embed_all`), which the run would do on first use anyway.

    Returns
    -------
    float
        Seconds per step, the median of the repeats.
    """
    cfg = trainer.config
    trainer.embed_all()
    times = []
    trainer.model.train()
    try:
        for r in range(repeats):
            rng = np.random.default_rng([cfg.seed, VALIDATION_SEED, 10**6 + r])
            start = time.perf_counter()
            for _ in range(cfg.images_per_step):
                parts = trainer.image_loss(trainer.train_data, int(rng.integers(len(trainer.train_data))), rng)
                if parts is not None:
                    parts.loss.backward()
            times.append(time.perf_counter() - start)
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.model.eval()
    return float(np.median(times))


def steps_for_minutes(trainer: Trainer, minutes: float, repeats: int = 3) -> int:
    """Size ``trainer``'s run so that it ends in about ``minutes`` from now.

    The step count (and with it the schedule's decay) is set from the measured cost of a
    step and of a validation (every ``validate_every`` steps); the warm-up is shortened
    to a tenth of the run when the run is short. A resumed trainer keeps the steps it has
    done and gets the remaining time's worth on top.

    Parameters
    ----------
    trainer
        Changed in place: its ``config`` gets the new ``steps`` (and ``warmup_steps``).
    minutes
        The budget, from now, measuring included.

    Returns
    -------
    int
        The new total of steps.

    Raises
    ------
    ValueError
        When the budget is not positive or does not hold a single step.
    """
    if not minutes > 0:
        raise ValueError(f"minutes must be positive, got {minutes}")
    start = time.perf_counter()
    cfg = trainer.config
    per_step = seconds_per_step(trainer, repeats)
    per_validation = 0.0
    if trainer.validation_data is not None and cfg.validate_every:
        t0 = time.perf_counter()
        if trainer.best is None:
            trainer.validate_step()  # the starting weights' validation, which the run makes first anyway
        else:
            trainer.validate()
        per_validation = time.perf_counter() - t0
    left = 60 * minutes - (time.perf_counter() - start)
    cost = per_step + per_validation / max(1, cfg.validate_every)
    steps = int(left / cost) if cost > 0 else 0
    if steps < 1:
        raise ValueError(f"{minutes} minute(s) do not hold one training step here ({cost:.1f} s per step)")
    total = trainer.step + steps
    warmup = min(cfg.warmup_steps, max(1, total // 10)) if trainer.step == 0 else cfg.warmup_steps
    trainer.config = dataclasses.replace(cfg, steps=total, warmup_steps=warmup)
    return total


class TimeBudget:
    """A run sized to end in ``minutes``, resized from its own pace as it goes.

    Parameters
    ----------
    trainer
        Sized now (:func:`steps_for_minutes`); its ``config.steps`` changes on :meth:`resize`.
    minutes
        The budget, from now.
    max_steps
        The run never grows past this many steps (it ends sooner, its schedule sized to them).
    """

    def __init__(self, trainer: Trainer, minutes: float, max_steps: int | None = None):
        self.end = time.monotonic() + 60 * minutes
        self.max_steps = max_steps
        self.steps = steps_for_minutes(trainer, minutes)
        if max_steps is not None and self.steps > max_steps:
            total = max(max_steps, trainer.step + 1)
            warmup = min(trainer.config.warmup_steps, max(1, total // 10)) if trainer.step == 0 \
                else trainer.config.warmup_steps  # as steps_for_minutes sizes a short run's warm-up
            trainer.config = dataclasses.replace(trainer.config, steps=total, warmup_steps=warmup)
            self.steps = total
        self._start = (time.monotonic(), trainer.step)

    def resize(self, trainer: Trainer) -> int:
        """Set the run's total steps from the pace so far (validations included) and the
        time left; the schedule's remaining decay stretches or shrinks to fit.

        Returns
        -------
        int
            The new total.
        """
        t0, step0 = self._start
        now = time.monotonic()
        if trainer.step <= step0 or now <= t0:
            return trainer.config.steps
        pace = (now - t0) / (trainer.step - step0)
        total = trainer.step + max(1, int((self.end - now) / pace))
        if self.max_steps is not None:
            total = max(min(total, self.max_steps), trainer.step)
        trainer.config = dataclasses.replace(trainer.config, steps=total)
        self.steps = total
        return total
