"""Encoder and click-to-mask timings of napari_sam's SAM, on this machine.

Prints one JSON object per line in the format of ``../shared/bench/official_sam.py``
(keys ``impl``, ``model``, ``what`` = ``encoder_s`` or ``decoder_ms``, ``dtype``, ``threads``,
``median``), so the two can be compared line by line:

    python benchmarks/model.py --models vit_b vit_t --threads 2
    bash ../shared/bench/official_sam.sh --models vit_b vit_t --threads 2

``--models default`` times the embedded default model as it ships (its 256-pixel input,
its mask refiner and mask chooser, on a grey plane). ``encoder_s``: seconds per image at
the model's input size (1024x1024 for SAM's) through the image encoder (float32 and
bfloat16 weights). ``decoder_ms``: milliseconds from a single click on an image whose
embedding is known to its mask at the original 1024x1024 size: prompt encoding, mask
decoding of the three multimask outputs, then the best one upscaled and thresholded,
which is what a click in the viewer needs (the official predictor upscales all three;
``decoder_all_ms`` times that too). Decoding runs through the traced graphs the
predictor uses by default; ``decoder_eager_ms`` is the same click without them.
``--busy-thread`` adds ``decoder_busy_ms``: the click computed in a worker thread while
the main thread runs Python, as in the viewer, traced and eager.
Weights are random: timing does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import numpy as np
import torch

from napari_sam.core.models import load_model
from napari_sam.core.predictor import Predictor
from napari_sam.core.runtime import configure_runtime
from napari_sam.model import build_sam


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def emit(**record) -> None:
    print(json.dumps({"impl": "napari_sam", **record}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["vit_b", "vit_t"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"],
                    help="encoder precisions; none skips the encoder")
    ap.add_argument("--busy-thread", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    # Models loaded by the package run under these process-wide settings (load_model
    # applies them); the models below are built in memory, so they are applied here.
    configure_runtime()
    img = (np.random.default_rng(0).random((1024, 1024, 3)) * 255).astype(np.uint8)
    for name in a.models:
        with torch.device("cpu"):
            # "default": the embedded model as it ships (256-pixel input, its mask refiner)
            sam = load_model("default", device="cpu", dtype="float32") if name == "default" else build_sam(name)
        x = torch.rand(1, 3, sam.config.image_size, sam.config.image_size) * 255
        with torch.inference_mode():
            for dtype in a.dtypes:
                sam.image_encoder.to(getattr(torch, dtype))
                sam.embed(x)  # warm-up
                ts = timed(lambda sam=sam, x=x: sam.embed(x), a.repeats)
                emit(model=name, what="encoder_s", dtype=dtype, threads=a.threads, median=statistics.median(ts), all=ts)
            sam.image_encoder.float()
        pt, lb = np.array([[500.0, 500.0]]), np.array([1])
        for route, traced in (("decoder", True), ("decoder_eager", False)):
            predictor = Predictor(sam, traced=traced)
            # the default model reads colour as H&E (its haematoxylin), where its mask refiner
            # and chooser stand aside: a grey plane times the click with both
            predictor.set_image(img[..., 0] if name == "default" else img)
            predictor.predict(points=pt, labels=lb)  # warm-up (and tracing)

            def click(predictor=predictor, pt=pt, lb=lb):
                return predictor.predict(points=pt, labels=lb, multimask=True).best_mask()

            ts = timed(click, 20)
            emit(model=name, what=f"{route}_ms", dtype="float32", threads=a.threads,
                 median=1000 * statistics.median(ts))
            if traced:
                ts = timed(lambda predictor=predictor, pt=pt, lb=lb:
                           predictor.predict(points=pt, labels=lb, multimask=True).masks, 20)
                emit(model=name, what="decoder_all_ms", dtype="float32", threads=a.threads,
                     median=1000 * statistics.median(ts))
            if a.busy_thread:
                ts = beside_busy_python(click, 10)
                emit(model=name, what="decoder_busy_ms", route="traced" if traced else "eager", dtype="float32",
                     threads=a.threads, median=1000 * statistics.median(ts))


def beside_busy_python(fn, repeats: int) -> list[float]:
    """Time ``fn`` in a worker thread while the main thread runs pure Python (a GUI
    thread drawing, in the viewer)."""
    out: list[float] = []
    worker = threading.Thread(target=lambda: out.extend(timed(fn, repeats)))
    worker.start()
    spins = 0
    while worker.is_alive():
        spins += 1
    return out


if __name__ == "__main__":
    main()
