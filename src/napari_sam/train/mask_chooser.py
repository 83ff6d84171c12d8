"""Training a :class:`~napari_sam.model.mask_chooser.MaskChooser` on a frozen SAM's answers.

Each image is embedded tile by tile as the plugin embeds it
(:class:`~napari_sam.core.embeddings.Embeddings`, at the magnification the model asks for),
and every labelled object that one tile holds whole is clicked, at its deepest pixel and at
``clicks - 1`` more pixels of its inner half (where people click), each click answered with
SAM's three masks (unrefined, ranked by the IoU head alone). A sample keeps the chooser's window
(:func:`~napari_sam.model.mask_chooser.chooser_windows`), the IoU head's values and each
mask's true IoU in the model-input frame. The chooser then learns to estimate those IoUs:
squared error, plus a cross-entropy that ranks the three estimates as the true IoUs rank the
masks; AdamW with a one-cycle schedule; the step with the best pick on the validation
samples is kept. The model is frozen, so the samples are computed once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from ..core.prompt_simulation import central_point, interior_point
from ..model.mask_chooser import MaskChooser, chooser_windows
from ..model.sam import Sam
from .mask_refiner import target_in_model_input, tiles_with_objects

__all__ = ["ChooserSamples", "MaskChooserConfig", "chooser_pick_iou", "collect_chooser_samples",
           "train_mask_chooser"]


@dataclass(frozen=True)
class MaskChooserConfig:
    """How a mask chooser is trained (docs/default_model.md, "A lone click's mask chosen by looking")."""

    width: int = 32
    steps: int = 1500
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    seed: int = 0
    validate_every: int = 250
    rank_temperature: float = 0.05
    """Softness of the ranking target: the softmax of the true IoUs over this."""
    regression_weight: float = 5.0


@dataclass
class ChooserSamples:
    """Lone clicks' three masks with what the chooser reads and must say.

    Attributes
    ----------
    windows
        (N, 4, W, W) float16 windows (:func:`~napari_sam.model.mask_chooser.chooser_windows`).
    predicted
        (N, 3) float32 the IoU head's values.
    true
        (N, 3) float32 each mask's IoU with the object, in the model-input frame.
    side
        (N,) float32 the windows' sides in model-input pixels.
    image
        (N,) which of the given planes each sample comes from.
    """

    windows: np.ndarray
    predicted: np.ndarray
    true: np.ndarray
    side: np.ndarray
    image: np.ndarray

    def __len__(self) -> int:
        return len(self.true)

    def __add__(self, other: "ChooserSamples") -> "ChooserSamples":
        return ChooserSamples(*(np.concatenate([getattr(self, k), getattr(other, k)])
                                for k in ("windows", "predicted", "true", "side", "image")))


def collect_chooser_samples(model: Sam, pairs: Sequence, clicks: int = 1, seed: int = 0, min_area: int = 16,
                            progress: Callable[[int, int, int], None] | None = None) -> ChooserSamples:
    """Click every object of ``pairs`` (``(image, labels)`` planes; labels 0 = background;
    images YX or YXC) as the module's docstring says. Objects smaller than ``min_area``
    pixels, or that no single tile holds whole, are left out. ``progress(done, of, samples)``
    after each plane."""
    from ..core.embeddings import Embeddings

    rng = np.random.default_rng(seed)
    size = model.config.image_size
    windows, predicted, true, sides, which = [], [], [], [], []
    for n, (image, labels) in enumerate(pairs):
        image, labels = np.asarray(image), np.asarray(labels)
        emb = Embeddings(image, model, cache=False, axes="YX" if image.ndim == 2 else "YXC", statistics="plane")
        for tile, input_size, masks in tiles_with_objects(emb, labels, min_area):
            y0, y1, x0, x1 = tile.outer
            grey = emb.model_input(0, tile.index)[0].mean(0).float()
            scale = np.array([input_size[1] / (x1 - x0), input_size[0] / (y1 - y0)])
            for mask in masks:
                target = torch.from_numpy(target_in_model_input(mask, input_size, size))
                for point in [interior_point(mask)] + [central_point(mask, rng) for _ in range(clicks - 1)]:
                    answer = emb.decode_tile(0, tile.index, point[None], np.array([1]), None, None, True,
                                             refine=False)
                    low = torch.from_numpy(np.asarray(answer.low_res_logits, np.float32))[None]
                    shown = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)[0] > 0
                    iou = (shown & target).sum((1, 2)) / (shown | target).sum((1, 2)).clamp(min=1)
                    window, side = chooser_windows(low, grey, torch.from_numpy(point * scale)[None])
                    windows.append(window[0].numpy().astype(np.float16))
                    predicted.append(np.asarray(answer.iou, np.float32))
                    true.append(iou.numpy().astype(np.float32))
                    sides.append(float(side[0]))
                    which.append(n)
        if progress is not None:
            progress(n + 1, len(pairs), len(true))
    if not true:
        raise ValueError(f"none of the {len(pairs)} planes holds an object of {min_area} pixels or more "
                         "that one tile holds whole: nothing to learn from")
    return ChooserSamples(np.stack(windows), np.stack(predicted), np.stack(true), np.array(sides, np.float32),
                          np.array(which))


def _scores(chooser: MaskChooser, samples: ChooserSamples, batch: int = 1024) -> np.ndarray:
    chooser.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            out.append(chooser(torch.from_numpy(samples.windows[i : i + batch]),
                               torch.from_numpy(samples.predicted[i : i + batch]),
                               torch.from_numpy(samples.side[i : i + batch])))
    return torch.cat(out).numpy()


def chooser_pick_iou(chooser: MaskChooser | None, samples: ChooserSamples) -> float:
    """Mean true IoU of the mask each click would show: the chooser's pick, or the IoU
    head's with ``chooser=None``."""
    scores = samples.predicted if chooser is None else _scores(chooser, samples)
    return float(samples.true[np.arange(len(samples)), scores.argmax(1)].mean())


def train_mask_chooser(samples: ChooserSamples, validation: ChooserSamples,
                       config: MaskChooserConfig = MaskChooserConfig(),
                       log: Callable[[dict], None] | None = None) -> MaskChooser:
    """Train a :class:`MaskChooser` on ``samples``; the weights of the validation step whose
    pick scored best on ``validation`` are returned."""
    torch.manual_seed(config.seed)
    chooser = MaskChooser(config.width)
    optimizer = torch.optim.AdamW(chooser.parameters(), config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=config.steps,
                                                   pct_start=0.05)
    rng = np.random.default_rng(config.seed)
    best, best_state = -1.0, None
    for step in range(1, config.steps + 1):
        chooser.train()
        idx = rng.integers(0, len(samples), config.batch_size)
        # quarter turns and flips: a nucleus has no preferred direction
        windows = torch.rot90(torch.from_numpy(samples.windows[idx].astype(np.float32)), int(rng.integers(4)), (2, 3))
        if rng.random() < 0.5:
            windows = windows.flip(3)
        true = torch.from_numpy(samples.true[idx])
        estimate = torch.sigmoid(chooser(windows, torch.from_numpy(samples.predicted[idx]),
                                         torch.from_numpy(samples.side[idx])))
        t = config.rank_temperature
        loss = config.regression_weight * F.mse_loss(estimate, true) + F.cross_entropy(estimate / t,
                                                                                         F.softmax(true / t, 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % config.validate_every == 0 or step == config.steps:
            pick = chooser_pick_iou(chooser, validation)
            if pick > best:
                best, best_state = pick, {k: v.clone() for k, v in chooser.state_dict().items()}
            if log is not None:
                log({"step": step, "loss": round(loss.item(), 4), "validation_pick_iou": round(pick, 4)})
    assert best_state is not None
    chooser.load_state_dict(best_state)
    return chooser.eval()
