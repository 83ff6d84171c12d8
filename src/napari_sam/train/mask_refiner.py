"""Training a :class:`~napari_sam.model.mask_refiner.MaskRefiner` on a frozen SAM's answers.

The samples are what the plugin produces: each image is embedded tile by tile as the
plugin embeds it (:class:`~napari_sam.core.embeddings.Embeddings`, at the magnification
the model asks for), and every labelled object that one tile holds whole is prompted as
the evaluation prompts it (one click on its deepest pixel with the best of three masks,
its bounding box, and that click with one corrective click and the first answer's logits
as the mask prompt). A sample keeps the low-res logits, the tile's model input and the
object's mask in the model-input frame. The head then learns, on windows around the
objects, to turn the enlarged logits into the object's mask: binary cross-entropy plus
dice, AdamW with a one-cycle schedule. The model is frozen throughout, so the samples are
computed once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from ..core.masks import prompt_box
from ..core.prompt_simulation import corrective_point, interior_point
from ..model.mask_refiner import MASK_REFINER_KEY, MaskRefiner
from ..model.sam import Sam

__all__ = ["MaskRefinerConfig", "MaskSamples", "collect_mask_samples", "mask_refiner_iou",
           "save_with_mask_refiner", "target_in_model_input", "tiles_with_objects", "train_mask_refiner"]

KINDS = ("point", "box", "correction")
"""The prompts each object is sampled with."""


@dataclass(frozen=True)
class MaskRefinerConfig:
    """How a mask refiner is trained (the defaults are those of the candidates in docs/default_model.md)."""

    width: int = 16
    depth: int = 5
    steps: int = 8000
    batch_size: int = 16
    window: int = 96
    """Side of the training windows, in model-input pixels, centred near an object."""
    jitter: int = 16
    """Most pixels a window's centre is moved from the object's."""
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    augment: bool = True
    """Random flips and quarter turns of the windows."""
    noise: float = 1.0
    """Half the windows get Gaussian noise of up to this many times their own standard
    deviation, and half have their contrast lowered (to 0.3-1x), so that the head meets
    planes worse than its training images (0: none). Measured neutral on held-out data
    (docs/default_model.md, "Trained on varied planes")."""


@dataclass
class MaskSamples:
    """Prompted masks of a frozen model, with what the refiner reads and must give.

    Attributes
    ----------
    images
        (T, S, S) float16: each tile's model input, channel mean (S: the input size).
    tile
        (N,) the tile of each sample.
    kind
        (N,) index into :data:`KINDS`.
    low
        (N, s, s) float16 low-res logits of the answer (s = S / 4).
    target
        (N, S, S) bool: the object in the model-input frame.
    """

    images: np.ndarray
    tile: np.ndarray
    kind: np.ndarray
    low: np.ndarray
    target: np.ndarray


def target_in_model_input(mask: np.ndarray, input_size: tuple[int, int], size: int) -> np.ndarray:
    """(size, size) bool: an object's (H, W) mask in the model-input frame, resized to the
    plane's ``input_size`` inside the zero-padded square input of side ``size``."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    t = F.interpolate(t, tuple(input_size), mode="bilinear", align_corners=False)[0, 0] > 0.5
    out = np.zeros((size, size), bool)
    out[: input_size[0], : input_size[1]] = t.numpy()
    return out


def tiles_with_objects(emb, labels: np.ndarray, min_area: int = 16) -> Iterator[tuple[Any, tuple[int, int], list]]:
    """Every tile of ``emb``'s grid (:class:`~napari_sam.core.embeddings.Embeddings` of one
    plane) with the objects of ``labels`` (the plane's, 0 = background) it answers for:
    ``(tile, input_size, masks)``, each mask (H, W) bool over ``tile.outer``. Each object
    comes once, in the tile whose interior holds its box's centre, if that tile holds it
    whole and it has ``min_area`` pixels or more."""
    boxes = ndimage.find_objects(labels)
    for tile in emb.grid:
        y0, y1, x0, x1 = tile.outer
        iy0, iy1, ix0, ix1 = tile.inner
        masks = []
        for label, box in enumerate(boxes, 1):
            if box is None or box[0].start < y0 or box[0].stop > y1 or box[1].start < x0 or box[1].stop > x1:
                continue
            cy, cx = (box[0].start + box[0].stop) / 2, (box[1].start + box[1].stop) / 2
            if not (iy0 <= cy < iy1 and ix0 <= cx < ix1):
                continue
            mask = labels[y0:y1, x0:x1] == label
            if mask.sum() >= min_area:
                masks.append(mask)
        yield tile, emb.embedding_for(0, tile.index).input_size, masks


def collect_mask_samples(model: Sam, pairs: Sequence, seed: int = 0, min_area: int = 16, corrections: int = 1,
                         progress: Callable[[int, int], None] | None = None) -> MaskSamples:
    """Prompt every object of ``pairs`` (``(image, labels)`` planes; labels 0 = background)
    as described in the module's docstring, with up to ``corrections`` corrective clicks
    after the first (each answer a sample). Objects smaller than ``min_area`` pixels, or
    that no single tile holds whole, are left out."""
    from ..core.embeddings import Embeddings

    rng = np.random.default_rng(seed)
    size = model.config.image_size
    images, tiles, kinds, lows, targets = [], [], [], [], []
    for n, (image, labels) in enumerate(pairs):
        image, labels = np.asarray(image), np.asarray(labels)
        emb = Embeddings(image, model, cache=False, axes="YX" if image.ndim == 2 else "YXC", statistics="plane")
        for tile, input_size, masks in tiles_with_objects(emb, labels, min_area):
            t = len(images)
            images.append(emb.model_input(0, tile.index)[0].mean(0).numpy().astype(np.float16))
            for mask in masks:
                point, fg = interior_point(mask)[None], np.array([1])
                first = emb.decode_tile(0, tile.index, point, fg, None, None, True)
                best = int(np.argmax(first.iou))
                answers = [first.low_res_logits[best],
                           emb.decode_tile(0, tile.index, None, None, prompt_box(mask), None, False).low_res_logits[0]]
                previous, answer = first.low_res_logits[best], first.mask(best)
                for _ in range(corrections):
                    fix = corrective_point(mask, answer, rng, "center")
                    if fix is None:
                        break
                    point, fg = np.concatenate([point, fix[0][None]]), np.append(fg, int(fix[1]))
                    again = emb.decode_tile(0, tile.index, point, fg, None, previous[None], False)
                    previous, answer = again.low_res_logits[0], again.mask(0)
                    answers.append(previous)
                target = target_in_model_input(mask, input_size, size)
                for k, low in enumerate(answers):
                    tiles.append(t)
                    kinds.append(min(k, len(KINDS) - 1))
                    lows.append(low.astype(np.float16))
                    targets.append(target)
        if progress is not None:
            progress(n + 1, len(pairs))
    return MaskSamples(np.stack(images), np.array(tiles), np.array(kinds), np.stack(lows), np.stack(targets))


def _enlarged(samples: MaskSamples, idx) -> torch.Tensor:
    low = torch.from_numpy(samples.low[idx].astype(np.float32))[:, None]
    return F.interpolate(low, samples.target.shape[-2:], mode="bilinear", align_corners=False)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def _windows(samples: MaskSamples, idx, config: MaskRefinerConfig, rng: np.random.Generator):
    logits = _enlarged(samples, idx).clamp(-20, 20)
    side, w = samples.target.shape[-1], config.window
    images, crops, targets = [], [], []
    for j, i in enumerate(idx):
        r0, r1, c0, c1 = _bbox(samples.target[i])
        cy, cx = (r0 + r1) // 2 + rng.integers(-config.jitter, config.jitter + 1), \
            (c0 + c1) // 2 + rng.integers(-config.jitter, config.jitter + 1)
        y, x = int(np.clip(cy - w // 2, 0, side - w)), int(np.clip(cx - w // 2, 0, side - w))
        # flips and quarter turns: the outlines of nuclei have no preferred direction
        turn, flip = (int(rng.integers(4)), bool(rng.integers(2))) if config.augment else (0, False)

        image = torch.from_numpy(samples.images[samples.tile[i], y : y + w, x : x + w].astype(np.float32))
        if config.noise > 0:
            image = _degraded(image, config.noise, rng)
        for out, t in ((images, image), (crops, logits[j, :, y : y + w, x : x + w]),
                       (targets, torch.from_numpy(samples.target[i, y : y + w, x : x + w]))):
            t = torch.rot90(t, turn, (-2, -1))
            out.append(t.flip(-1) if flip else t)
    return torch.stack(images)[:, None], torch.stack(crops), torch.stack(targets)[:, None].float()


def _degraded(image: torch.Tensor, noise: float, rng: np.random.Generator) -> torch.Tensor:
    if rng.random() < 0.5:
        mean = image.mean()
        image = mean + (image - mean) * float(rng.uniform(0.3, 1.0))
    if rng.random() < 0.5:
        scale = float(rng.uniform(0, noise)) * float(image.std())
        image = image + scale * torch.from_numpy(rng.standard_normal(image.shape).astype(np.float32))
    return image


def train_mask_refiner(samples: MaskSamples, config: MaskRefinerConfig = MaskRefinerConfig(),
                       checkpoint_dir: str | os.PathLike | None = None,
                       log: Callable[[dict], None] | None = None) -> MaskRefiner:
    """Train a :class:`MaskRefiner` on ``samples``.

    With ``checkpoint_dir``, the state is saved there every 500 steps (``last.pt``, read
    back with ``weights_only=True``) and a run started again with the same configuration
    resumes from it; ``log`` gets ``{"step", "loss"}`` every 100 steps.
    """
    torch.manual_seed(config.seed)
    refiner = MaskRefiner(config.width, config.depth).train()
    opt = torch.optim.AdamW(refiner.parameters(), config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, config.learning_rate, total_steps=config.steps,
                                                   pct_start=max(0.05, 2 / config.steps))
    start, rng = 0, np.random.default_rng(config.seed)
    path = None if checkpoint_dir is None else Path(checkpoint_dir) / "last.pt"
    if path is not None and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["config"] != json.dumps(asdict(config), sort_keys=True):
            raise ValueError(f"{path} holds a run with another configuration; use another folder")
        refiner.load_state_dict(state["refiner"])
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, rng = int(state["step"]), np.random.default_rng([config.seed, int(state["step"])])
    running = []
    for step in range(start, config.steps):
        idx = rng.integers(0, len(samples.kind), config.batch_size)
        image, logits, target = _windows(samples, idx, config, rng)
        out = refiner(logits.new_zeros((len(idx), 0, *logits.shape[-2:])), logits, image)
        p = torch.sigmoid(out)
        dice = 1 - (2 * (p * target).sum((1, 2, 3)) + 1) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
        loss = F.binary_cross_entropy_with_logits(out, target) + dice.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        running.append(float(loss.detach()))
        if log is not None and (step + 1) % 100 == 0:
            log({"step": step + 1, "loss": float(np.mean(running))})
            running = []
        if path is not None and ((step + 1) % 500 == 0 or step + 1 == config.steps):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"refiner": refiner.state_dict(), "optimizer": opt.state_dict(),
                        "schedule": schedule.state_dict(), "step": step + 1,
                        "config": json.dumps(asdict(config), sort_keys=True)}, tmp)
            os.replace(tmp, path)
            # a resumed run draws from a generator seeded by its step, as this one goes on to
            rng = np.random.default_rng([config.seed, step + 1])
    return refiner.eval()


@torch.inference_mode()
def mask_refiner_iou(refiner: MaskRefiner | None, samples: MaskSamples) -> dict[str, float]:
    """Mean IoU per prompt kind (:data:`KINDS`) in the model-input frame, of the enlarged
    logits (``refiner=None``) or of the refined ones."""
    scores: dict[str, list[float]] = {k: [] for k in KINDS}
    for i in range(len(samples.kind)):
        logits = _enlarged(samples, [i])
        if refiner is not None:
            image = torch.from_numpy(samples.images[samples.tile[i]].astype(np.float32))[None, None]
            logits = refiner.refine(logits, image)
        mask, target = logits[0, 0].numpy() > 0, samples.target[i]
        scores[KINDS[samples.kind[i]]].append((mask & target).sum() / max(1, (mask | target).sum()))
    return {k: float(np.mean(v)) for k, v in scores.items() if v}


def save_with_mask_refiner(path: str | os.PathLike, refiner: MaskRefiner, provenance: dict | None = None) -> Path:
    """Store ``refiner`` in the checkpoint at ``path`` beside what it holds (SAM weights,
    instance decoder, metadata), under ``"mask_refiner_state"``, with ``provenance``
    (plain JSON types) as ``metadata["mask_refiner"]``. Written atomically."""
    from ..model.checkpoint import read_checkpoint, write_checkpoint

    checkpoint = read_checkpoint(path)
    meta = dict(checkpoint.metadata)
    if provenance is not None:
        meta["mask_refiner"] = provenance
    extras = dict(checkpoint.extras)
    extras[MASK_REFINER_KEY] = {k: v.detach().float().cpu() for k, v in refiner.state_dict().items()}
    write_checkpoint(path, checkpoint.state_dict, meta, extras)
    return Path(path)
