"""napari_sam's SAM against the official implementation, interleaved in one process.

The two benchmark scripts (``benchmarks/model.py`` and ``../shared/bench/official_sam.sh``)
run one after the other, and the speed of a shared VM drifts between runs (the official
vit_b encoder has measured 12 to 17 s here within an hour). This script alternates the
two implementations round by round, on the same perturbed vit_b weights and the same
input, so that each ratio is measured under the same conditions. Run it in the official
implementation's environment with this repository's ``src`` on the path:

    bash ../shared/bench/official_sam.sh --models          # builds /tmp/official-sam-venv once
    PYTHONPATH=src:../shared/bench/stubs /tmp/official-sam-venv/bin/python benchmarks/versus_official.py

Prints one JSON object per measurement (``what``: ``encoder_s`` float32 and bfloat16,
the official one under autocast as its benchmark does; ``decoder_ms``, a click to its
best mask at the original 1024x1024 size; ``impl``; ``median`` over the rounds), then one
``ratio`` line per measurement. Both run under the allocator setting our load_model makes
(glibc keeps freed blocks), which helps the official code too: these ratios isolate the
code.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np
import torch
from precision import perturbed_official

from napari_sam.core.predictor import Predictor
from napari_sam.core.runtime import configure_runtime
from napari_sam.model import sam_from_state_dict


def seconds(fn, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clicks", type=int, default=20, help="clicks timed per round")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    configure_runtime()
    from segment_anything import SamPredictor

    official = perturbed_official(0)
    ours = sam_from_state_dict(official.state_dict())
    ours_bf16 = copy.deepcopy(ours)
    ours_bf16.image_encoder.to(torch.bfloat16)
    x = torch.randn(1, 3, 1024, 1024)
    image = (np.random.default_rng(0).random((1024, 1024, 3)) * 255).astype(np.uint8)
    point, label = np.array([[500.0, 500.0]]), np.array([1])

    theirs = SamPredictor(official)
    mine = Predictor(ours)

    def official_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            official.image_encoder(x)

    runs = {
        ("encoder_s", "float32", "official"): lambda: seconds(lambda: official.image_encoder(x)),
        ("encoder_s", "float32", "napari_sam"): lambda: seconds(lambda: ours.image_encoder(x)),
        ("encoder_s", "bfloat16", "official"): lambda: seconds(official_bf16),
        ("encoder_s", "bfloat16", "napari_sam"): lambda: seconds(lambda: ours_bf16.image_encoder(x.bfloat16())),
        ("decoder_ms", "float32", "official"): lambda: 1000 * seconds(
            lambda: theirs.predict(point_coords=point, point_labels=label, multimask_output=True), a.clicks
        ),
        ("decoder_ms", "float32", "napari_sam"): lambda: 1000 * seconds(
            lambda: mine.predict(points=point, labels=label, multimask=True).best_mask(), a.clicks
        ),
    }
    with torch.inference_mode():
        theirs.set_image(image)
        mine.set_image(image)
        for run in runs.values():  # warm-up (and our decoder's trace)
            run()
        times: dict[tuple, list[float]] = {key: [] for key in runs}
        for _ in range(a.rounds):
            for key, run in runs.items():
                times[key].append(run())
    for (what, dtype, impl), ts in times.items():
        print(json.dumps({"impl": impl, "what": what, "dtype": dtype, "threads": a.threads, "rounds": a.rounds,
                          "median": statistics.median(ts), "all": ts}), flush=True)
    for what, dtype in dict.fromkeys((w, d) for w, d, _ in times):
        ratio = statistics.median(times[(what, dtype, "official")]) / statistics.median(
            times[(what, dtype, "napari_sam")]
        )
        print(json.dumps({"what": what, "dtype": dtype, "ratio": ratio, "against": "official, same dtype"}), flush=True)
    ratio = statistics.median(times[("encoder_s", "float32", "official")]) / statistics.median(
        times[("encoder_s", "bfloat16", "napari_sam")]
    )
    print(json.dumps({"what": "encoder_s", "dtype": "bfloat16", "ratio": ratio, "against": "official float32"}),
          flush=True)


if __name__ == "__main__":
    main()
