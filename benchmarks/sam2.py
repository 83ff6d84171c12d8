"""Our SAM 2.1 against the official ``sam2`` 1.1.0 on CPU, in one run.

Three measurements, each on the same weights (random, in the official key layout: the
official builder's model with every entry redrawn by ``scripts/make_sam2_reference.py``'s
``randomise``, seeded, then loaded into ours strictly) and the same inputs:

- **encoder**: ``forward_image`` of one (1, 3, 1024, 1024) input, tiny and small; the
  outputs (``backbone_fpn``, three levels) are compared, so that the speed is at parity.
- **tracking only**: propagation through a short stack (``--frames``, prompts by one point
  per object on frame 0, forward), with every frame's features computed beforehand by each
  side (the official predictor's ``_get_image_feature`` is served from a dict, ours from
  the ``features`` callable); the time of ``propagate_in_video`` / ``Sam2Video.propagate``
  (the prompted frame's memory encoding included) per tracked frame and object.
- **with encoder**: the whole session as each runs out of the box, per frame and object:
  the official ``init_state`` (frames to model input), the prompts and ``propagate_in_video``,
  which runs the encoder on every frame; ours through the plugin's feature cache
  (:class:`~napari_sam.core.sam2_features.Sam2Features` in a Zarr folder) and
  :class:`~napari_sam.model.sam2.video.Sam2Video`: ``cold`` computes and writes every
  frame's features, ``warm`` reads them back (re-propagation, other objects, a correction).

The official code runs in ONE subprocess of ``--reference-python`` (the venv of
``scripts/make_sam2_venv.sh``; default: this python, which then needs ``sam2``), kept alive
and driven step by step, so that the sides alternate per repetition (who goes first too)
under the same load, each as it ships: ours under ``configure_runtime`` (glibc keeps freed
blocks; oneDNN where measured faster), the official without (``--same-allocator``: with the
glibc setting). ``--threads`` threads, float32, ``torch.inference_mode``::

    .venv/bin/python benchmarks/sam2.py --reference-python /work/sam2venv/bin/python [--quick]

``--quick``: once, with the small reference model of ``tests/reference/sam2/sam2_small_seed0``
(checks the script; no speed figure). Median over ``--repeats``; ratio official/ours (> 1:
ours faster). From the first repetition: ``max |diff|`` of our outputs from the official
ones (``of max |x|``: their largest magnitude) and ``masks`` (equal pixels of logits > 0).

``--bound``: after the timed repetitions, one call of each encoder and tracking-only
measurement per side under torch's profiler, with the seconds spent in the kernels that
do the arithmetic (matrix products, CPU flash attention, convolutions: :data:`KERNELS`,
the same torch kernels on the same shapes on both sides). ``bound`` is the official
median over our seconds in those kernels: the speed-up ours would reach if everything
else it does (copies, norms, activations, Python) cost nothing, so a target above it
needs less arithmetic, not leaner code.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# This file is called sam2.py: keep its folder from shadowing the official package ``sam2``.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE), str(ROOT / "scripts")]
YAML = {"tiny": "configs/sam2.1/sam2.1_hiera_t.yaml", "small": "configs/sam2.1/sam2.1_hiera_s.yaml"}
REFERENCE = ROOT / "tests" / "reference" / "sam2" / "sam2_small_seed0"


def _reference():
    import make_sam2_reference  # the generator of the reference sets: stand-ins, randomise, inputs

    return make_sam2_reference


def seconds(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# The kernels that do the arithmetic, the same torch kernels on both sides: what is left of
# a side's time when everything else (copies, normalisation, activations, Python) is free.
KERNELS = {
    "matrix products": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_linear",
                        "aten::_mkldnn_linear", "aten::mkldnn_matmul"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
    "convolutions": ("aten::mkldnn_convolution", "aten::_convolution_mode", "aten::_nnpack_spatial_convolution"),
}


def profiled(fn) -> tuple[float, dict, object]:
    """(seconds, {kernel group: self seconds}, output) of one call under torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t, out = seconds(fn)
    own = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    return t, {group: sum(own.get(name, 0.0) for name in names) for group, names in KERNELS.items()}, out


# --------------------------------------------------------------------------- the official side
class Official:
    """The official models and their timings; runs where ``sam2`` imports."""

    def setup(self, job: dict) -> dict:
        from instance_decoder import keep_freed_memory

        torch.set_num_threads(job["threads"])
        keep_freed_memory(job["same_allocator"])
        ref = _reference()
        ref._install_torchvision_stand_in()
        import sam2.sam2_video_predictor as svp
        from hydra import compose
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
        from sam2.build_sam import build_sam2_video_predictor

        self.svp, self.ref = svp, ref
        self.frames = job["frames"].numpy()
        self.models, self.features, made = {}, {}, {}
        for name in job["models"]:
            if name == "reference":
                node = json.loads((REFERENCE / "config.json").read_text())
                model = instantiate(OmegaConf.create(node), _recursive_=True).eval()
                state = torch.load(REFERENCE / "weights.pth", weights_only=True)["model"]
                model.load_state_dict(state)
            else:
                torch.manual_seed(job["seed"])
                extra = list(ref.VIDEO_EXTRA)  # the video predictor's settings with fill_hole_area=0 (no sam2._C)
                model = build_sam2_video_predictor(YAML[name], None, device="cpu", mode="eval",
                                                   apply_postprocessing=False, hydra_overrides_extra=extra)
                state = ref.randomise(model, job["seed"])
                cfg = compose(config_name=YAML[name],
                              overrides=["++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor"] + extra)
                OmegaConf.resolve(cfg)
                node = OmegaConf.to_container(cfg.model, resolve=True)
            self.models[name] = model
            made[name] = {"state": state, "node": json.dumps(node)}
            if name in job["trackers"]:
                x = ref.video_input(self.frames, model.image_size)
                with torch.inference_mode():
                    self.features[name] = [model.forward_image(x[i:i + 1]) for i in range(len(x))]
        return made

    def encoder(self, job: dict) -> dict:
        model, x = self.models[job["model"]], job["x"]
        times = []
        with torch.inference_mode():
            if job.get("profile"):
                t, kernels, _ = profiled(lambda: model.forward_image(x))
                return {"seconds": t, "kernels": kernels}
            for _ in range(job["calls"]):
                t, out = seconds(lambda: model.forward_image(x))
                times.append(t)
        return {"times": times, "out": [f.clone() for f in out["backbone_fpn"]] if job["keep"] else None}

    def track(self, job: dict) -> dict:
        name, mode = job["model"], job["mode"]
        model, frames = self.models[name], self.frames
        T, H, W = frames.shape[:3]
        self.svp.load_video_frames = lambda **kw: (self.ref.video_input(frames, model.image_size), H, W)
        model.__dict__.pop("_get_image_feature", None)
        if mode == "tracking":
            feats = self.features[name]

            def cached(self_, state, frame_idx, batch_size):
                out = feats[frame_idx]
                grow = {k: [f.expand(batch_size, -1, -1, -1) for f in out[k]] for k in ("backbone_fpn",
                                                                                       "vision_pos_enc")}
                image = state["images"][frame_idx][None].expand(batch_size, -1, -1, -1)
                return (image,) + self_._prepare_backbone_features(grow)

            model._get_image_feature = types.MethodType(cached, model)

        def prompts():
            state = model.init_state(video_path="<frames in memory>")
            for k, point in enumerate(job["points"]):
                model.add_new_points_or_box(state, 0, k + 1, points=[point], labels=[1])
            return state

        def propagate(state):
            return torch.stack([m[:, 0] for _, _, m in model.propagate_in_video(state)])

        with torch.inference_mode():
            if job.get("profile"):  # tracking only
                state = prompts()
                t, kernels, _ = profiled(lambda: propagate(state))
                return {"seconds": t, "kernels": kernels}
            if mode == "tracking":
                state = prompts()
                t, logits = seconds(lambda: propagate(state))
            else:
                t, logits = seconds(lambda: propagate(prompts()))
        return {"seconds": t, "logits": logits if job["keep"] else None}


def serve() -> None:
    """The subprocess: one job file per line on stdin, ``ok`` or ``error: ...`` on stdout."""
    reply, sys.stdout = sys.stdout, sys.stderr  # nothing but replies on the pipe
    side = Official()
    for line in sys.stdin:
        job_file, result_file = line.split()
        try:
            job = torch.load(job_file, weights_only=True)
            torch.save(getattr(side, job["op"])(job), result_file)
            print("ok", file=reply, flush=True)
        except Exception as err:  # reported by the parent, which stops
            print(f"error: {type(err).__name__}: {err}".replace("\n", " "), file=reply, flush=True)


class Subprocess:
    """The official side in its own venv, alive for the whole run."""

    def __init__(self, python: str):
        self.tmp = tempfile.TemporaryDirectory(prefix="napari_sam_bench_sam2_")
        self.log = open(Path(self.tmp.name) / "official.log", "w+")
        self.proc = subprocess.Popen([python, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)

    def __call__(self, job: dict) -> dict:
        job_file, result_file = Path(self.tmp.name) / "job.pt", Path(self.tmp.name) / "result.pt"
        torch.save(job, job_file)
        self.proc.stdin.write(f"{job_file} {result_file}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if answer != "ok":
            self.log.seek(0)
            tail = self.log.read()[-3000:]
            raise SystemExit(f"the official side failed on {job['op']}: {answer or 'no answer'}\n{tail}")
        return torch.load(result_file, weights_only=True)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()
        self.tmp.cleanup()


# --------------------------------------------------------------------------- our side
class Ours:
    """Our models on the official weights, timed the way the plugin runs them."""

    def __init__(self, made: dict, gray: np.ndarray, trackers: list[str]):
        from napari_sam.model.checkpoint import ModelSource
        from napari_sam.model.sam2 import config_from_official, sam2_from_state_dict
        from napari_sam.model.sam2.image_predictor import preprocess

        self.gray, self.models, self.features = gray, {}, {}
        for name, m in made.items():
            model = sam2_from_state_dict(m["state"], config_from_official(json.loads(m["node"]), name=name)).eval()
            # as load_sam2_model leaves it: the cache signature names the checkpoint, not a hash of the weights
            model.source = ModelSource(name=f"bench-{name}", path="", dtype="float32", _checksum=f"bench:{name}")
            self.models[name] = model
            if name in trackers:
                c = model.config
                with torch.inference_mode():
                    self.features[name] = [model.forward_image(preprocess(np.repeat(g[..., None], 3, -1),
                                                                          c.image_size, c.pixel_mean, c.pixel_std))
                                           for g in gray]

    def profile(self, name: str, what: str, x: torch.Tensor, points: list) -> dict:
        """One profiled encoder call (``what="encoder"``) or tracking-only propagation."""
        model = self.models[name]
        if what == "encoder":
            with torch.inference_mode():
                t, kernels, _ = profiled(lambda: model.forward_image(x))
        else:
            video = self._video(name, "tracking", points, None)
            with torch.inference_mode():
                t, kernels, _ = profiled(lambda: list(video.propagate()))
        return {"seconds": t, "kernels": kernels}

    def encoder(self, name: str, x: torch.Tensor, calls: int) -> tuple[list[float], list[torch.Tensor]]:
        model, times = self.models[name], []
        with torch.inference_mode():
            for _ in range(calls):
                t, out = seconds(lambda: model.forward_image(x))
                times.append(t)
        return times, out["backbone_fpn"]

    def _video(self, name: str, mode: str, points: list, cache: Path | None):
        """A video session prompted by one point per object on frame 0, as the plugin runs it."""
        from napari_sam.core.sam2_features import Sam2Features
        from napari_sam.model.sam2.video import Sam2Video

        model, (T, H, W) = self.models[name], self.gray.shape
        if mode == "tracking":
            frames = self.features[name].__getitem__
        else:
            feats = Sam2Features(self.gray, model, cache, axes="ZYX")
            frames = feats.frames([(i,) for i in range(T)], feats.windows[0, 0])
        video = Sam2Video(model, frames, T, (H, W), fill_hole_area=0)
        for k, point in enumerate(points):
            video.add_points(0, k + 1, [point], [1])
        return video

    def track(self, name: str, mode: str, points: list, cache: Path | None = None) -> tuple[float, torch.Tensor]:
        def prompts():
            return self._video(name, mode, points, cache)

        def propagate(video):
            return torch.stack([logits for _, _, logits in video.propagate()])

        if mode == "tracking":
            video = prompts()
            return seconds(lambda: propagate(video))
        return seconds(lambda: propagate(prompts()))


# --------------------------------------------------------------------------- the run
def agreement(a, b) -> tuple[float, float, float]:
    """(max |a - b|, max |b|, share of equal signs) over tensors or lists of them; b is the official."""
    a, b = (list(x) if isinstance(x, (list, tuple)) else [x] for x in (a, b))
    diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
    same = sum(((x > 0) == (y > 0)).sum().item() for x, y in zip(a, b)) / sum(x.numel() for x in a)
    return diff, max(y.float().abs().max().item() for y in b), same


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} logical cores"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference-python", help="python of a venv holding sam2 1.1.0 (default: this one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="alternating repetitions of every measurement")
    ap.add_argument("--encoder-calls", type=int, default=2, help="encoder calls per side and repetition")
    ap.add_argument("--encoders", nargs="+", choices=list(YAML), default=list(YAML))
    ap.add_argument("--tracker", choices=list(YAML), default="tiny", help="the model propagation is timed with")
    ap.add_argument("--objects", nargs="+", type=int, default=[1, 3], choices=[1, 2, 3])
    ap.add_argument("--frames", type=int, default=6, help="planes of the synthetic stack")
    ap.add_argument("--side", type=int, default=512, help="plane side in pixels (both resize it to the model input)")
    ap.add_argument("--what", nargs="+", choices=("encoder", "tracking", "session"),
                    default=["encoder", "tracking", "session"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--same-allocator", action="store_true", help="the official side under our glibc setting too")
    ap.add_argument("--quick", action="store_true", help="one repetition with the small reference model")
    ap.add_argument("--bound", action="store_true",
                    help="also profile one call per side: the time in the arithmetic kernels both share and the "
                         "speed-up that leaves possible")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve:
        return serve()
    if a.repeats < 1 or a.encoder_calls < 1 or a.frames < 2:
        ap.error("--repeats and --encoder-calls must be at least 1, --frames at least 2")
    encoders, tracker = (["reference"], "reference") if a.quick else (a.encoders, a.tracker)
    if a.quick:
        a.repeats, a.encoder_calls, a.frames = 1, 1, min(a.frames, 4)
    from instance_decoder import cpu_header

    from napari_sam.core.runtime import configure_runtime

    torch.set_num_threads(a.threads)
    settings = configure_runtime()
    print("\n".join(cpu_header(a.threads)))
    print(f"ours under configure_runtime ({settings}); the official's process with the same allocator setting: "
          f"{'yes' if a.same_allocator else 'no'}\nat the start: {load_line()}", flush=True)

    ref = _reference()
    rgb, centres, _ = ref.video_frames(np.random.default_rng(a.seed), a.frames, a.side, a.side)
    gray = np.round(rgb.mean(-1)).astype(np.uint8)  # a microscopy-like stack: one channel, given as RGB to the official
    models = list(dict.fromkeys(encoders + ([tracker] if {"tracking", "session"} & set(a.what) else [])))
    official = Subprocess(a.reference_python or sys.executable)
    try:
        made = official({"op": "setup", "threads": a.threads, "same_allocator": a.same_allocator, "seed": a.seed,
                         "models": models, "trackers": [tracker],
                         "frames": torch.from_numpy(np.repeat(gray[..., None], 3, -1))})
        ours = Ours(made, gray, [tracker])
        rows = run(a, official, ours, encoders, tracker, centres[0])
    finally:
        official.close()
    report(a, rows, tracker)
    bound_report(rows)
    print(f"at the end: {load_line()}")


def run(a, official, ours, encoders, tracker, centres) -> dict:
    """Every measurement, official and ours alternating; rows of the table by key."""
    rows: dict = {}
    x = torch.randn((1, 3, 1024, 1024), generator=torch.Generator().manual_seed(a.seed))
    encoders = encoders if "encoder" in a.what else []
    for name in encoders:  # warm-up and the comparison of outputs
        theirs = official({"op": "encoder", "model": name, "x": x, "calls": 1, "keep": True})["out"]
        rows[("encoder", name, 0)] = {"official": [], "ours": [], "agree": [agreement(ours.encoder(name, x, 1)[1],
                                                                                      theirs)]}
    modes = [m for m in ("tracking", "session") if m in a.what]
    if modes:  # first calls of the tracking code (thread pools, kernels)
        point = [[float(centres[0][0]), float(centres[0][1])]]
        official({"op": "track", "model": tracker, "mode": "tracking", "points": point, "keep": False})
        ours.track(tracker, "tracking", point)
    with tempfile.TemporaryDirectory(prefix="napari_sam_bench_sam2_cache_") as tmp:
        for r in range(a.repeats):
            order = ("official", "ours") if r % 2 == 0 else ("ours", "official")
            for name, side in itertools.product(encoders, order):
                job = {"op": "encoder", "model": name, "x": x, "calls": a.encoder_calls, "keep": False}
                rows[("encoder", name, 0)][side] += (official(job)["times"] if side == "official"
                                                     else ours.encoder(name, x, a.encoder_calls)[0])
            for n, mode in itertools.product(a.objects, modes):
                points = [[float(c[0]), float(c[1])] for c in centres[:n]]
                row = rows.setdefault((mode, tracker, n), {"official": [], "ours": [], "warm": []})
                for side in order:
                    if side == "official":
                        got = official({"op": "track", "model": tracker, "mode": mode, "points": points,
                                        "keep": r == 0})
                        row["official"].append(got["seconds"])
                        row["theirs"] = got["logits"] if r == 0 else None
                    else:  # a session twice on one cache: cold (computes, writes), then warm (reads)
                        cache = Path(tmp) / f"{mode}_{n}_{r}.zarr"
                        done = [ours.track(tracker, mode, points, cache) for _ in range(1 + (mode == "session"))]
                        row["ours"].append(done[0][0])
                        row["warm"] += [t for t, _ in done[1:]]
                        mine = [logits for _, logits in done]
                if r == 0:
                    row["agree"] = [agreement(m, row["theirs"]) for m in mine]
                print(f"  repetition {r + 1}/{a.repeats}: {mode}, {n} object(s) done; {load_line()}", flush=True)
    if a.bound:  # after the timed repetitions, so that the profiler never slows them
        for name in encoders:
            rows[("encoder", name, 0)]["profiles"] = {
                "official": official({"op": "encoder", "model": name, "x": x, "profile": True}),
                "ours": ours.profile(name, "encoder", x, [])}
        if "tracking" in modes:
            for n in a.objects:
                points = [[float(c[0]), float(c[1])] for c in centres[:n]]
                rows[("tracking", tracker, n)]["profiles"] = {
                    "official": official({"op": "track", "model": tracker, "mode": "tracking", "points": points,
                                          "keep": False, "profile": True}),
                    "ours": ours.profile(tracker, "tracking", x, points)}
    return rows


def bound_report(rows: dict) -> None:
    """How much faster ours could be at all: the official time over the seconds our own
    run spends in the arithmetic kernels (matrix products, attention, convolutions: the
    same torch kernels on both sides, on the same shapes), as if all else were free."""
    profiled_rows = {key: row for key, row in rows.items() if "profiles" in row}
    if not profiled_rows:
        return
    groups = list(KERNELS)
    print("\nthe arithmetic both sides share (one profiled call each; seconds of the call, of which in "
          + ", ".join(groups) + "); bound = official median / ours in those kernels")
    head = (f"{'measurement':<16} {'model':<6} {'objects':>7} {'side':<9} {'call s':>7} "
            + " ".join(f"{g:>15}" for g in groups) + f" {'share':>6} {'bound':>7}")
    print(head + "\n" + "-" * len(head))
    for (mode, model, n), row in profiled_rows.items():
        official_median = statistics.median(row["official"])
        for side in ("official", "ours"):
            got = row["profiles"][side]
            total = sum(got["kernels"].values())
            bound = f"{official_median / total:6.2f}x" if side == "ours" else ""
            print(f"{mode:<16} {model:<6} {n if n else '-':>7} {side:<9} {got['seconds']:7.3f} "
                  + " ".join(f"{got['kernels'][g]:15.3f}" for g in groups)
                  + f" {100 * total / got['seconds']:5.0f}% {bound:>7}")


def report(a, rows: dict, tracker: str) -> None:
    T = a.frames
    print(f"\nseconds, median of {a.repeats} repetition(s); encoder: per (1, 3, 1024, 1024) frame "
          f"({a.encoder_calls} call(s) per repetition and side, after 1 warm-up); propagation: a {T}-plane "
          f"{a.side} x {a.side} stack, prompts on plane 0, forward, '{tracker}' model; tracking only: per tracked "
          f"frame ({T - 1}) and object; with encoder: the whole session per frame ({T}) and object")
    head = (f"{'measurement':<28} {'model':<9} {'objects':>7} {'official s':>11} {'ours s':>9} "
            f"{'official/ours':>14} {'max |diff|':>11} {'of max |x|':>10} {'masks':>9}")
    print(head + "\n" + "-" * len(head))

    def line(what, model, n, off, mine, agree):
        diff, scale, same = agree
        print(f"{what:<28} {model:<9} {n:>7} {off:11.3f} {mine:9.3f} {off / mine:13.2f}x {diff:11.2e} {scale:10.3g} "
              f"{100 * same:8.4f}%")

    for (mode, model, n), row in rows.items():
        med = {k: statistics.median(v) for k, v in row.items() if k in ("official", "ours", "warm") and v}
        if mode == "encoder":
            line("encoder (forward_image)", model, "-", med["official"], med["ours"], row["agree"][0])
        elif mode == "tracking":
            per = (T - 1) * n
            line("tracking only", model, n, med["official"] / per, med["ours"] / per, row["agree"][0])
        else:
            per = T * n
            line("with encoder, cold cache", model, n, med["official"] / per, med["ours"] / per, row["agree"][0])
            line("with encoder, warm cache", model, n, med["official"] / per, med["warm"] / per, row["agree"][1])


if __name__ == "__main__":
    main()
