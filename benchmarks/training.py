"""Training speed on this machine: decoder-only fine-tuning on cached embeddings and
full-model steps.

    python benchmarks/training.py [--models vit_t vit_b] [--steps 5] [--threads 2]

Prints one JSON object per line: ``steps_per_s`` for each model and mode, with the
settings of a step (objects per image, corrective iterations) as SAM trains (8 objects,
3 corrective iterations here). Weights are random and the data are real (DSB 2018
nuclei from ../shared/data): the time of a step does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def emit(**record) -> None:
    print(json.dumps({"impl": "napari_sam", **record}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["vit_t", "vit_b"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018_fluo"))
    args = ap.parse_args()

    import torch

    from napari_sam.model import build_sam
    from napari_sam.train import SegmentationDataset, Trainer, TrainingConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    data = SegmentationDataset.from_folder(args.data).subset(range(2))
    for name in args.models:
        for mode in ("decoder", "full"):
            torch.manual_seed(0)
            model = build_sam(name)
            config = TrainingConfig(mode=mode, steps=args.steps + 1, warmup_steps=1, validate_every=0)
            trainer = Trainer(model, data, config)
            # the first step embeds the images (decoder mode caches them) and warms up
            t = time.perf_counter()
            trainer.train_step()
            first = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step()
            seconds = (time.perf_counter() - t) / args.steps
            emit(what="steps_per_s", model=name, mode=mode, threads=torch.get_num_threads(),
                 objects_per_image=config.objects_per_image, corrective_iterations=config.corrective_iterations,
                 steps_per_s=round(1 / seconds, 3), s_per_step=round(seconds, 2), first_step_s=round(first, 1),
                 cpus=os.cpu_count(), images=len(data),
                 image_shapes=[list(np.shape(data[i].image)) for i in range(len(data))])


if __name__ == "__main__":
    main()
