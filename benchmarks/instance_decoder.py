"""The instance decoder and the AIS post-processing against micro-sam's originals, in one run.

Times napari_sam's :class:`~napari_sam.model.instance_decoder.InstanceDecoder` and the
decoder micro-sam 1.8.14 builds (``micro_sam.instance_segmentation.get_decoder``: torch-em
0.10.9's UNETR decoder in a ``DecoderAdapter``) on the same random weights and the same
embedding, at ``vit_b`` geometry (a (1, 256, 64, 64) embedding, 1024 x 1024 maps) and
micro-sam's decoder width (64), for both upsampling layouts (bilinear + 1x1 convolution,
and transposed convolutions). Then times the AIS post-processing on one synthetic
1024 x 1024 plane of touching ellipses: ours (``napari_sam.auto.ais.instances_from_maps``)
and micro-sam's (``InstanceSegmentationWithDecoder.generate`` on the same maps).

The original runs in the venv that holds it (see ``scripts/make_instance_decoder_reference.py``),
as a subprocess of this script with the same seed and thread count; the weights it draws
come back to this process, so both decoders compute with identical parameters, and the
outputs are compared as a sanity check::

    .venv/bin/python benchmarks/instance_decoder.py --reference-python /work/refvenv/bin/python

Without ``--reference-python`` the original is run in this process if micro-sam and
torch-em import here. Timings: median of ``--repeats`` calls after ``--warmup`` calls, in
milliseconds per embedding (batch 1), under ``torch.no_grad``. ``forward`` is what a user
calls (maps at the original size, here 1024 x 1024: the original interpolates them to
1024 once more, ours skips interpolating to the size they have); ``maps`` is the network
alone (the original's ``_forward_impl``, ours ``maps``). The original runs first, then ours,
alternately per ``--rounds``, so that load from other processes affects both alike.

Our decoder runs with the package's process-wide settings (``configure_runtime``, which
``load_model`` applies: glibc keeps freed memory for reuse); ``--same-allocator`` applies
the same glibc setting to the original's process, to compare the code alone.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"bilinear": False, "transposed": True}
"""Upsampling layout -> whether it uses transposed convolutions."""
WHAT = ("forward", "maps")


def timed(fn, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t))
    return out


def cpu_header(threads: int) -> list[str]:
    """The processor, its bfloat16 flags, torch's version and the thread count."""
    model, flags = "unknown", set()
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            model = value.strip()
        elif key.strip() == "Flags":
            flags = set(value.split())
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return [
        f"cpu: {model}; {os.cpu_count()} logical cores visible",
        "flags: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted),
        f"torch {torch.__version__}, {threads} thread(s), float32, batch 1",
    ]


def keep_freed_memory(enabled: bool) -> None:
    """glibc's setting that napari_sam's ``configure_runtime`` makes, for the original's process."""
    if enabled and sys.platform.startswith("linux"):
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt(-4, 0)  # M_MMAP_MAX
        mallopt(-1, 1024 ** 3)  # M_TRIM_THRESHOLD


def synthetic_maps(side: int, objects: int, seed: int) -> tuple[np.ndarray, int]:
    """(3, side, side) float32 maps of random touching ellipses, blurred and noisy like a
    decoder's prediction: foreground, distance to the object's centre and to its boundary
    (each normalised per object, 1 outside objects), and the number of objects drawn."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:side, :side]
    drawn = np.zeros((side, side), np.int32)
    for i in range(1, objects + 1):
        cy, cx = rng.uniform(0, side, 2)
        a, b = rng.uniform(6, 22, 2)
        t = rng.uniform(0, np.pi)
        r0, r1 = max(int(cy - 23), 0), min(int(cy + 24), side)
        c0, c1 = max(int(cx - 23), 0), min(int(cx + 24), side)
        dy, dx = rows[r0:r1, c0:c1] - cy, cols[r0:r1, c0:c1] - cx
        u, v = dy * np.cos(t) + dx * np.sin(t), -dy * np.sin(t) + dx * np.cos(t)
        drawn[r0:r1, c0:c1][(u / a) ** 2 + (v / b) ** 2 <= 1] = i
    labels, n = ndi.label(drawn > 0)  # touching ellipses merge; enough for timing
    labels = drawn * (labels > 0)
    maps = np.ones((3, side, side), np.float32)
    maps[0] = labels > 0
    for i, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        inside = labels[box] == i
        depth = ndi.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
        cy, cx = (np.mean(ix) for ix in np.nonzero(inside))
        rr, cc = np.mgrid[: inside.shape[0], : inside.shape[1]]
        centre = np.hypot(rr - cy, cc - cx)
        maps[1][box][inside] = (centre / max(centre[inside].max(), 1e-6))[inside]
        maps[2][box][inside] = (1 - depth / depth.max())[inside]
    maps = np.stack([ndi.gaussian_filter(m, 1.0) for m in maps])
    maps = np.clip(maps + rng.normal(0, 0.05, maps.shape), 0, 1).astype(np.float32)
    return maps, int(len(np.unique(labels)) - 1)


def _original_decoder(variant: str, width: int, image_size: int, seed: int):
    """micro-sam's decoder, built and loaded by micro-sam with every parameter drawn from ``seed``."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_instance_decoder_reference import _randomise, _torchvision_stand_ins

    _torchvision_stand_ins()
    import micro_sam.instance_segmentation as mis
    from segment_anything.modeling import ImageEncoderViT
    from torch_em.model.unetr import UNETR

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # The decoder reads only the encoder's input side and embedding width.
    encoder = ImageEncoderViT(
        img_size=image_size, patch_size=16, embed_dim=16, depth=1, num_heads=1, mlp_ratio=1.0,
        out_chans=256, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True, window_size=0, global_attn_indexes=(0,),
    ).eval()
    mis.UNETR = partial(UNETR, initial_features=width)
    unetr = mis.UNETR(
        backbone="sam", encoder=encoder, out_channels=3, use_sam_stats=True, final_activation="Sigmoid",
        use_skip_connection=False, resize_input=True, use_conv_transpose=VARIANTS[variant],
    )
    _randomise(torch.nn.ModuleDict({k: v for k, v in unetr.named_children() if k != "encoder"}), generator)
    state = {k: v.clone() for k, v in unetr.state_dict().items() if not k.startswith("encoder")}
    return mis.get_decoder(encoder, state, device="cpu").eval(), state


def run_original(job: dict) -> dict:
    """Time the original decoders and post-processing on ``job``'s inputs; runs where micro-sam imports."""
    torch.set_num_threads(job["threads"])
    keep_freed_memory(job["same_allocator"])
    embedding, size = job["embedding"], (job["image_size"],) * 2
    result: dict = {}
    for variant in job["variants"]:
        decoder, state = _original_decoder(variant, job["width"], job["image_size"], job["seed"])
        calls = {"forward": lambda d=decoder: d(embedding, size, size),
                 "maps": lambda d=decoder: d._forward_impl(embedding)}
        with torch.no_grad():
            result[variant] = {"state": state, "output": calls["forward"]().contiguous()}
            for what in job["what"]:
                # the call that gave the output above is the first warm-up
                result[variant][what] = torch.tensor(timed(calls[what], job["warmup"] - 1, job["repeats"]))
    if job.get("maps") is not None:
        from micro_sam.instance_segmentation import InstanceSegmentationWithDecoder

        maps = job["maps"].numpy()
        segmenter = InstanceSegmentationWithDecoder(predictor=None, decoder=None)
        segmenter.set_state({"foreground": maps[0], "center_distances": maps[1], "boundary_distances": maps[2]})
        labels = {}
        times = timed(lambda: labels.setdefault("last", segmenter.generate()), 1, job["ais_repeats"])
        last = torch.from_numpy(np.asarray(labels["last"]).astype(np.int64))
        result["ais"] = {"times": torch.tensor(times), "labels": last}
    return result


def original_in_subprocess(python: str, job: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="napari_sam_bench_") as tmp:
        job_file, result_file = Path(tmp) / "job.pt", Path(tmp) / "result.pt"
        torch.save(job, job_file)
        done = subprocess.run([python, __file__, "--run-original", str(job_file), str(result_file)], check=False)
        if done.returncode != 0:
            raise SystemExit(f"the original's benchmark failed in {python} (exit {done.returncode}); see above")
        return torch.load(result_file, weights_only=True)


def original_here(job: dict) -> dict:
    try:
        import micro_sam.instance_segmentation  # noqa: F401
        import torch_em  # noqa: F401
    except Exception as err:
        raise SystemExit(
            f"micro-sam or torch-em does not import here ({type(err).__name__}: {err}); pass --reference-python "
            "with the python of a venv that holds them (scripts/make_instance_decoder_reference.py says how)"
        ) from None
    return run_original(job)


def time_ours(variant: str, state: dict, embedding: torch.Tensor, image_size: int, what, warmup, repeats) -> dict:
    from napari_sam.model.instance_decoder import instance_decoder_from_state_dict

    decoder = instance_decoder_from_state_dict(state)
    if decoder.config.transposed != VARIANTS[variant]:
        raise SystemExit(f"{variant}: our decoder read transposed={decoder.config.transposed} from the keys")
    size = (image_size,) * 2
    calls = {"forward": lambda: decoder(embedding, size, size), "maps": lambda: decoder.maps(embedding)}
    with torch.no_grad():
        out = {"output": calls["forward"]()}
        for name in what:
            out[name] = torch.tensor(timed(calls[name], warmup - 1, repeats))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference-python", help="python of the venv holding micro-sam 1.8.14 and torch-em 0.10.9")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per variant and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first (at least 1: the compared output)")
    ap.add_argument("--rounds", type=int, default=1, help="original then ours, this many times; times pooled")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--what", nargs="+", choices=WHAT, default=list(WHAT))
    ap.add_argument("--width", type=int, default=64, help="decoder width (initial features; 64 in micro-sam)")
    ap.add_argument("--image-size", type=int, default=1024, help="SAM input side (1024 for vit_b)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ais-objects", type=int, default=700, help="ellipses drawn on the 1024 x 1024 plane")
    ap.add_argument("--ais-repeats", type=int, default=5)
    ap.add_argument("--same-allocator", action="store_true",
                    help="give the original's process the glibc setting that configure_runtime gives ours")
    ap.add_argument("--run-original", nargs=2, metavar=("JOB", "RESULT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.warmup < 1 or a.repeats < 1 or a.rounds < 1:
        ap.error("--warmup, --repeats and --rounds must be at least 1")
    if a.run_original:
        torch.save(run_original(torch.load(a.run_original[0], weights_only=True)), a.run_original[1])
        return

    from napari_sam.auto.ais import instances_from_maps
    from napari_sam.core.runtime import configure_runtime

    torch.set_num_threads(a.threads)
    settings = configure_runtime()
    print("\n".join(cpu_header(a.threads)))
    print(f"ours under configure_runtime ({settings}); original's process with the same allocator setting: "
          f"{'yes' if a.same_allocator else 'no'}")
    generator = torch.Generator().manual_seed(a.seed)
    grid = a.image_size // 16
    embedding = torch.randn((1, 256, grid, grid), generator=generator) * 0.5
    maps, drawn = synthetic_maps(1024, a.ais_objects, a.seed)
    job = {"threads": a.threads, "same_allocator": a.same_allocator, "embedding": embedding,
           "image_size": a.image_size, "width": a.width, "seed": a.seed, "variants": a.variants,
           "what": a.what, "warmup": a.warmup, "repeats": a.repeats, "ais_repeats": a.ais_repeats}
    ref: dict = {}
    ours: dict = {}
    for r in range(a.rounds):
        job["maps"] = torch.from_numpy(maps) if r == 0 else None
        got = original_in_subprocess(a.reference_python, job) if a.reference_python else original_here(job)
        for variant in a.variants:
            mine = time_ours(variant, got[variant]["state"], embedding, a.image_size, a.what, a.warmup, a.repeats)
            for store, res in ((ref, got[variant]), (ours, mine)):
                slot = store.setdefault(variant, {"output": res["output"]})
                for what in a.what:
                    slot.setdefault(what, []).extend(res[what].tolist())
        if "ais" in got:
            ref["ais"] = got["ais"]

    print(f"\ninstance decoder, width {a.width}, embedding (1, 256, {grid}, {grid}) -> maps {a.image_size} x "
          f"{a.image_size}; ms per embedding, median of {a.rounds * a.repeats} after {a.warmup} warm-up")
    head = f"{'variant':<11} {'call':<8} {'original ms':>12} {'ours ms':>10} {'ours/original':>14} {'max |diff|':>11}"
    print(head + "\n" + "-" * len(head))
    for variant in a.variants:
        diff = (ours[variant]["output"] - ref[variant]["output"]).abs().max().item()
        for what in a.what:
            o, m = statistics.median(ref[variant][what]), statistics.median(ours[variant][what])
            print(f"{variant:<11} {what:<8} {o:12.1f} {m:10.1f} {m / o:14.3f} {diff:11.2e}")

    times = timed(lambda: instances_from_maps(maps[0], maps[1], maps[2]), 1, a.ais_repeats)
    labels = instances_from_maps(maps[0], maps[1], maps[2])
    print(f"\nAIS post-processing, 1024 x 1024 synthetic maps ({drawn} objects drawn), default settings, "
          f"median of {a.ais_repeats} after 1 warm-up")
    line = (f"{'':<11} {'original ms':>12} {'ours ms':>10} {'ours/original':>14} {'objects (orig/ours)':>20} "
            f"{'pixels differing':>17}")
    print(line + "\n" + "-" * len(line))
    o, m = statistics.median(ref["ais"]["times"].tolist()), statistics.median(times)
    theirs = ref["ais"]["labels"].numpy()
    differing = int(np.count_nonzero(theirs != labels))
    print(f"{'AIS':<11} {o:12.1f} {m:10.1f} {m / o:14.3f} {f'{theirs.max()}/{labels.max()}':>20} "
          f"{differing:>17}")


if __name__ == "__main__":
    main()
