"""A larger image encoder for a trained small SAM, taught by the encoder it replaces.

Training a SAM from scratch on two CPU cores spends most of its hour teaching the mask
decoder to read prompts at all. To give the default model a larger image encoder
without paying for that again, the new encoder first learns to reproduce the old one's
image embeddings (mean squared error, as MobileSAM distilled SAM's ViT-H), and the old
prompt encoder and mask decoder are kept; end-to-end training then starts from a model
that already segments, and the larger encoder has room to do better than its teacher.

Used by ``scripts/train_default_model.py --init-from CKPT --distill-minutes M``; not part
of the package.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from napari_sam.core.preprocess import Normalization, prepare_plane
from napari_sam.model import Sam, SamConfig, build_sam
from napari_sam.train import SegmentationDataset


def with_new_encoder(teacher: Sam, config: SamConfig) -> Sam:
    """A SAM with a freshly initialised image encoder of ``config`` and copies of the
    ``teacher``'s prompt encoder and mask decoder.

    Parameters
    ----------
    teacher
        The trained model; its encoder's output (1, 256, S, S) must have the shape the
        new encoder gives (same input size and patch size).
    config
        The new model's configuration.
    """
    student = build_sam(config)
    student.prompt_encoder.load_state_dict(teacher.prompt_encoder.state_dict())
    student.mask_decoder.load_state_dict(teacher.mask_decoder.state_dict())
    if "scale" in teacher.metadata:
        student.metadata = {"scale": teacher.metadata["scale"]}
    return student


def distill_encoder(
    student: Sam,
    teacher: Sam,
    data: SegmentationDataset,
    minutes: float,
    normalization: Normalization,
    learning_rate: float = 1e-3,
    images_per_step: int = 4,
    seed: int = 0,
    steps: int | None = None,
) -> list[float]:
    """Train ``student.image_encoder`` to give ``teacher``'s image embeddings.

    AdamW with 20 warm-up steps and a cosine decay over the time given (to 5 %), weight
    decay 0.05, gradient clipping at 1. Planes are drawn at random from ``data`` and
    prepared as the trainer prepares them (``prepare_plane`` to the model's input side).

    Parameters
    ----------
    minutes
        Wall-clock budget; the schedule follows the elapsed fraction of it.
    steps
        A fixed number of optimiser steps instead (the schedule follows them; ``minutes``
        is ignored): what repeats a run exactly, whatever the machine's speed.
    images_per_step
        Planes whose losses are averaged into each optimiser step.

    Returns
    -------
    list of float
        The loss of every step (mean squared error per embedding element).
    """
    rng = np.random.default_rng(seed)
    teacher.eval()
    student.train()
    encoder = student.image_encoder
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=learning_rate, weight_decay=0.05)
    size = student.config.image_size
    budget = minutes * 60.0
    start = time.perf_counter()
    losses: list[float] = []
    step = 0
    while True:
        elapsed = time.perf_counter() - start
        if (elapsed >= budget) if steps is None else (step >= steps):
            break
        fraction = elapsed / budget if steps is None else step / steps
        warm = min(1.0, (step + 1) / 20)
        lr = learning_rate * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * fraction)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(images_per_step):
            index = int(rng.integers(len(data)))
            x, _ = prepare_plane(data[index].image, normalization, data.channel_axis, data.channel, long_side=size)
            with torch.no_grad():
                target = teacher.embed(x)
            loss = torch.nn.functional.mse_loss(student.embed(x), target) / images_per_step
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        optimizer.step()
        losses.append(total)
        step += 1
        if step % 50 == 0:
            print(f"distill step {step}  mse {np.mean(losses[-50:]):.4f}  lr {lr:.2e}  {elapsed / 60:.1f} min",
                  flush=True)
    student.eval()
    print(f"distilled the encoder in {step} steps ({step * images_per_step} planes), last mse "
          f"{np.mean(losses[-50:]):.4f}", flush=True)
    return losses
