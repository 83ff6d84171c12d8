"""The training loop: optimizer steps over simulated sessions, validation, saving.
:class:`Trainer` runs the steps and yields a :class:`TrainingRecord` per step, so a GUI or
a progress bar can drive it; :func:`~napari_sam.train.run.train` wraps it with tqdm.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..core.image_embedding import ImageEmbedding
from ..core.scale import magnification_for
from ..model import Sam
from ..model.checkpoint import PathLike
from . import checkpoints
from .config import TrainingConfig
from .dataset import SegmentationDataset
from .features import TrainingEmbeddings, autocast
from .parameters import make_optimizer, set_trainable
from .session import LossParts, draw_objects, session_loss
from .tiles import inference_tiles
from .validation import VALIDATION_SEED, validation_iou

__all__ = ["Trainer", "TrainingRecord"]


@dataclass(frozen=True)
class TrainingRecord:
    """What one training step reports.

    Attributes
    ----------
    step
        Steps completed, this one included.
    loss
        Total loss of the step (mask loss plus weighted IoU loss, mean over iterations).
    mask_loss, iou_loss
        Its two parts (unweighted).
    train_iou
        Mean IoU of the last iteration's masks with the ground truth (low-res frame).
    learning_rate
        Used for this step.
    seconds
        Wall time of the step.
    validation_iou
        Mean IoU on the validation data when this step validated, else None.
    validation
        Its breakdown (``point``, ``box``, ``objects``) or None.
    """

    step: int
    loss: float
    mask_loss: float
    iou_loss: float
    train_iou: float
    learning_rate: float
    seconds: float
    validation_iou: float | None = None
    validation: dict[str, float] | None = None


class Trainer:
    """Fine-tunes a SAM on instance-labelled planes.

    Parameters
    ----------
    model
        The model to train, in place (it is moved to ``device``; in ``"full"`` mode its
        encoder is cast to float32). Gradients are switched on for the trained parts
        and off for the rest.
    train_data
        Training pairs.
    config
        Settings; see :class:`TrainingConfig`.
    validation_data
        Pairs to measure the IoU on (point and box prompts), or None.
    device
        ``"cpu"``, ``"cuda"``, ... or None/``"auto"`` for the best one present.

    Attributes
    ----------
    step
        Optimizer steps done.
    history
        ``{"step", "loss"}`` per step (with ``"validation_iou"`` where it validated).
    base_model
        Provenance of the model the run started from (kept in checkpoints).
    param_names
        Names of the trainable parameters, in the optimizer's order.
    best
        ``(step, validation IoU)`` of the best validation so far, or None; its weights
        are kept (on the CPU) for :meth:`keep_best`.
    weights_step
        The step whose weights the model holds when :meth:`keep_best` went back to an
        earlier one, else None (the last step's).

    Examples
    --------
    >>> data = SegmentationDataset.from_folder("dsb2018_fluo")          # doctest: +SKIP
    >>> trainer = Trainer(load_model("vit_b"), data, TrainingConfig(steps=500))  # doctest: +SKIP
    >>> for record in trainer.run():                                   # doctest: +SKIP
    ...     print(record.step, record.loss)
    >>> trainer.save("vit_b_nuclei.pth")                               # doctest: +SKIP
    """

    def __init__(self, model: Sam, train_data: SegmentationDataset, config: TrainingConfig | None = None,
                 validation_data: SegmentationDataset | None = None, device: str | torch.device | None = None):
        from ..core.models import resolve_device

        if not isinstance(model, Sam):
            raise ValueError(f"model must be a Sam, not {type(model).__name__}")
        if len(train_data) == 0:
            raise ValueError("the training data hold no pair")
        self.config = (config or TrainingConfig()).with_base_recipe(model.metadata)
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        if self.config.native_tiles:
            tiles = partial(inference_tiles, image_size=model.config.image_size, magnification=partial(
                magnification_for, model), min_object_pixels=self.config.min_object_pixels)
            train_data = tiles(train_data)
            validation_data = None if validation_data is None else tiles(validation_data)
        self.train_data = train_data
        self.validation_data = validation_data
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._embeddings = TrainingEmbeddings(self.model, self.config, self.device)
        self.base_model = checkpoints.describe_base(model)

        if self.config.bfloat16 and self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"bfloat16 autocast is supported on CPU and CUDA, not {self.device.type}")
        self.param_names = set_trainable(self.model, self.config)
        self.optimizer = make_optimizer(self.model, self.param_names, self.config)
        self.best: tuple[int, float] | None = None
        self.weights_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None  # the best validation's weights, on the CPU

    # -- features ----------------------------------------------------------------------
    def _features(self, data: SegmentationDataset, index: int, grad: bool) -> ImageEmbedding:
        return self._embeddings.get(data, index, grad)

    # -- one image ---------------------------------------------------------------------
    def _decode(self, emb: ImageEmbedding, points, labels, boxes, mask_input, multimask: bool):
        with autocast(self.device, self.config):
            low, iou = self.model.decode(
                emb.features, points, labels, boxes, mask_input, multimask_output=multimask, context=None
            )
        return low.float(), iou.float()

    def image_loss(self, data: SegmentationDataset, index: int, rng: np.random.Generator) -> LossParts | None:
        """Simulate an interactive session on one image and return its loss.

        Draws up to ``objects_per_image`` objects, gives each a first prompt (a point in it
        or its box), then ``corrective_iterations`` more rounds with a point in the larger
        error region of the previous mask and that mask's logits as mask prompt
        (:mod:`~napari_sam.train.session`, which draws them all). Gradients flow when
        called with grad enabled.

        Parameters
        ----------
        data
            The dataset.
        index
            Which pair.
        rng
            Every random draw comes from it.

        Returns
        -------
        loss parts or None
            None when the plane has no object of ``min_object_pixels`` pixels.
        """
        masks = draw_objects(data[index].labels, self.config, rng)
        if masks is None:
            return None
        emb = self._features(data, index, grad=torch.is_grad_enabled())
        return session_loss(self._decode, self.model, emb, masks, self.config, rng)

    # -- steps -------------------------------------------------------------------------
    def _rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, step])

    def train_step(self) -> TrainingRecord:
        """One optimizer step; returns its record (without validation)."""
        cfg = self.config
        start = time.perf_counter()
        rng = self._rng(self.step)
        lr = cfg.learning_rate_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = np.zeros(4)
        done = attempts = 0
        while done < cfg.images_per_step:
            attempts += 1
            if attempts > 20 * cfg.images_per_step:
                raise ValueError(
                    f"the training data hold no object of at least {cfg.min_object_pixels} pixels "
                    f"(tried {attempts - 1} draws)"
                )
            parts = self.image_loss(self.train_data, int(rng.integers(len(self.train_data))), rng)
            if parts is None:
                continue
            (parts.loss / cfg.images_per_step).backward()
            sums += [float(t.detach()) for t in (parts.loss, parts.mask_loss, parts.iou_loss)] + [parts.train_iou]
            done += 1
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], cfg.grad_clip
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        self.step += 1
        loss, mloss, iloss, tiou = (sums / cfg.images_per_step).tolist()
        self.history.append({"step": self.step, "loss": loss})
        return TrainingRecord(self.step, loss, mloss, iloss, tiou, lr, time.perf_counter() - start)

    def evaluate_loss(self, index: int = 0, seed: int = 0, data: SegmentationDataset | None = None) -> float:
        """The loss of one image with prompts drawn from ``seed``, without learning.

        The same ``index`` and ``seed`` give the same objects and prompts each time (the
        corrective points follow the model's own mistakes), which makes it a fixed batch
        to watch the loss on.

        Parameters
        ----------
        index
            Which pair.
        seed
            Seeds the draws.
        data
            The dataset; the training data by default.
        """
        data = self.train_data if data is None else data
        with torch.no_grad():
            parts = self.image_loss(data, index, np.random.default_rng([seed, VALIDATION_SEED, index]))
        if parts is None:
            raise ValueError(f"pair {index} has no object of at least {self.config.min_object_pixels} pixels")
        return float(parts.loss)

    def validate(self, data: SegmentationDataset | None = None) -> dict[str, float]:
        """Mean IoU of single-prompt predictions on validation data.

        Each validation object is prompted once with its most central point (the mask
        with the highest predicted IoU wins, as in the predictor) and once with its exact
        bounding box; the IoU is measured at the original resolution. Objects are drawn
        with a fixed seed, so successive validations compare the same objects.

        Parameters
        ----------
        data
            Defaults to the trainer's validation data.

        Returns
        -------
        dict
            ``iou`` (mean of both prompt kinds), ``point``, ``box`` and ``objects``.

        Raises
        ------
        ValueError
            Without validation data, or when they hold no object.
        """
        data = self.validation_data if data is None else data
        if data is None:
            raise ValueError("no validation data: pass validation_data to the Trainer or to validate()")
        return validation_iou(self.model, data, self.config, partial(self._features, grad=False), self._decode)

    def run(self, until: int | None = None) -> Iterator[TrainingRecord]:
        """Train step by step, yielding a record after each.

        Parameters
        ----------
        until
            Stop once this many steps are done in total (``config.steps`` by default, read
            at every step, so a time budget may resize the run; a resumed trainer continues
            from where it stopped).

        Yields
        ------
        TrainingRecord
            With ``validation_iou`` set on the steps that validated.
        """
        if self.step == 0 and self.best is None and self.validation_data is not None and self.config.validate_every:
            self.validate_step()  # the starting weights compete too: fine-tuning must beat them
        while self.step < (self.config.steps if until is None else int(until)):
            record = self.train_step()
            cfg = self.config
            last = self.step in (cfg.steps, until)
            due = cfg.validate_every and (self.step % cfg.validate_every == 0 or last)
            if self.validation_data is not None and due:
                val = self.validate_step()
                record = dataclasses.replace(record, validation_iou=val["iou"], validation=val)
            yield record

    def validate_step(self) -> dict[str, float]:
        """:meth:`validate` the current weights, note it in the history and remember them
        if they are the best so far."""
        val = self.validate()
        if self.history and self.history[-1]["step"] == self.step:
            self.history[-1]["validation_iou"] = val["iou"]
        if self.best is None or val["iou"] > self.best[1]:
            self.remember_best(self.step, val["iou"])
        return val

    def remember_best(self, step: int, score: float, state: dict[str, torch.Tensor] | None = None) -> None:
        """Keep the current weights (or ``state``, by name) as the best validation's (``score`` at ``step``)."""
        self.best = (int(step), float(score))
        named = dict(self.model.named_parameters())
        self.best_state = state or {n: named[n].detach().to("cpu", copy=True) for n in self.param_names}

    def keep_best(self) -> int:
        """Go back to the weights of the best validation; returns the step whose weights
        the model now holds.

        Fine-tuning on a few images can overfit: the trained parts go back to the best
        validation IoU (without validation, or when the last step was best, nothing changes).
        """
        if self.best is None or self.best_state is None or self.best[0] == self.step:
            return self.step if self.weights_step is None else self.weights_step
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self.best_state.items():
                named[name].copy_(value.to(named[name].device))
        self.weights_step = self.best[0]
        return self.weights_step

    def embed_all(self) -> None:
        """Embed every plane now (only ``"decoder"`` mode keeps them)."""
        for data in (self.train_data, self.validation_data) if self.config.mode == "decoder" else ():
            for index in range(len(data) if data is not None else 0):
                self._features(data, index, grad=False)

    # -- checkpoints -------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """The configuration and training provenance written into checkpoints."""
        return checkpoints.training_metadata(self)

    def save(self, path: PathLike, optimizer: bool = True) -> Path:
        """Write the model as a checkpoint that :func:`~napari_sam.core.models.load_model`
        reads, plus (with ``optimizer``) the optimizer state beside it for resuming.

        Parameters
        ----------
        path
            The checkpoint file (``.pth``).
        optimizer
            Also write :func:`optimizer_state_path` (tensors and plain values only; with
            the best validated weights when the model holds later ones).

        Returns
        -------
        pathlib.Path
            ``path``.
        """
        return checkpoints.save(self, path, optimizer)

    @classmethod
    def resume(
        cls,
        path: PathLike,
        train_data: SegmentationDataset,
        validation_data: SegmentationDataset | None = None,
        config: TrainingConfig | None = None,
        device: str | torch.device | None = None,
    ) -> "Trainer":
        """Continue a run from a checkpoint written by :meth:`save`.

        The model, the step count, the loss history, the best validation (its weights
        from the optimizer-state file when the checkpoint holds later ones) and the
        optimizer state (when its file is beside the checkpoint and readable) are restored;
        the settings too, unless ``config`` replaces them (for instance with a larger
        ``steps``).

        Parameters
        ----------
        path
            The checkpoint.
        train_data, validation_data
            The data (not stored in checkpoints, only described).
        config
            Settings to use instead of the saved ones.
        device
            Where to train.

        Raises
        ------
        ValueError
            When the checkpoint holds no training metadata.
        """
        return checkpoints.resume(cls, path, train_data, validation_data, config, device)
