"""Interactive latency of the napari plugin, measured in a real viewer (run under Xvfb).

    xvfb-run -a python benchmarks/viewer.py [--model vit_b] [--clicks 10]

Prints one JSON object per line:

* ``click_to_preview_ms``: from a point added to the "SAM points" layer to the first
  canvas draw showing the new mask, on a 1024 x 1024 slice of real nuclei (the shared 512 x 512
  DSB image, 2 x 2 times) whose embedding is cached, through the widget's thread worker
  and the Qt event loop (what a user waits for). Each click lands on a nucleus. The
  record splits the time into ``segment`` (the worker's
  :meth:`~napari_sam.layers.ViewerSession.compute_preview`), ``show`` (putting the mask
  into the preview layer, GUI thread) and ``overhead`` (the rest: drawing the new point,
  signals, thread start, the draw that shows the mask);
* ``correction_to_preview_ms``: the same for a second point on the object, answered
  with the first answer as mask prompt;
* ``frame_interval_ms``: how late a 60 Hz Qt timer fires (the viewer's frame budget),
  idle and while the widget embeds slices in its worker. micro-sam had to turn its
  workers off because they slowed napari down; this shows whether ours do.

``--model default`` (the default when installed) is the shipped default model; the
official architectures run with random weights: their decoder time does not depend on the
weights, but their random masks spill over tile borders, which makes the tiled answer ask
neighbouring tiles, so they overstate what a trained model costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def emit(**record) -> None:
    print(json.dumps({"impl": "napari_sam", **record}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, choices=["default", "vit_b", "vit_t", "vit_l", "vit_h"],
                    help="default: the shipped default model if installed, else vit_b")
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=8.0, help="frame sampling per condition")
    args = ap.parse_args()

    import napari
    import tifffile
    import torch
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_sam._qt.widget import SamWidget
    from napari_sam.core.models import DEFAULT_CHECKPOINT
    from napari_sam.core.prompt_simulation import interior_point
    from napari_sam.model import build_sam

    scratch = tempfile.mkdtemp(prefix="napari-sam-viewer-bench-")
    if args.model is None:
        args.model = "default" if DEFAULT_CHECKPOINT.is_file() else "vit_b"
    if args.model == "default":
        ckpt = "default"
    else:
        ckpt = os.path.join(scratch, f"{args.model}_random.pth")
        torch.manual_seed(0)
        torch.save(build_sam(args.model).state_dict(), ckpt)
    os.environ["NAPARI_SAM_MODEL"] = ckpt
    os.environ.setdefault("NAPARI_SAM_CACHE_DIR", scratch)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "stardist_bundled"
    nuclei, nuclei_labels = tifffile.imread(shared / "img2d.tif"), tifffile.imread(shared / "mask2d.tif")

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    rng = np.random.default_rng(0)
    plane = np.tile(nuclei, (2, 2))
    plane_labels = np.tile(nuclei_labels, (2, 2)).astype(np.int64)
    plane_labels[512:] += plane_labels.max()  # the copies are other objects
    plane_labels[:, 512:] += 2 * plane_labels.max()
    plane_labels[np.tile(nuclei_labels, (2, 2)) == 0] = 0
    volume = np.stack([plane] * 4)
    viewer.add_image(volume, name="volume")
    ids = [i for i in np.unique(plane_labels) if i and (plane_labels == i).sum() > 50]

    widget = SamWidget(viewer)
    viewer.window.add_dock_widget(widget)

    def wait(condition, timeout=600.0):
        end = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > end:
                raise TimeoutError("the viewer did not finish in time")
            app.processEvents()
            time.sleep(0.001)

    widget.start_session()
    wait(lambda: widget.session is not None)
    session = widget.session
    viewer.dims.set_current_step(0, 0)
    widget.run_embedding(current=True)
    wait(lambda: not widget.workers.busy)

    # Time the two halves of a preview where they run: instance attributes shadow the
    # methods the widget looks up.
    spent = {"segment": 0.0, "show": 0.0}
    compute, show = session.compute_preview, session.show_preview

    def timed(name, fn):
        def call(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += (time.perf_counter() - t0) * 1000
        return call

    session.compute_preview, session.show_preview = timed("segment", compute), timed("show", show)
    # "Visible" is the first canvas draw after the preview layer got the mask. The clock
    # runs in Qt's own event loop (as in napari), not in a Python polling loop, which
    # would hold the GIL the worker needs between torch calls.
    draws: list[float] = []
    viewer.window._qt_viewer.canvas._scene_canvas.events.draw.connect(lambda _e: draws.append(time.perf_counter()))
    shown = [0.0]
    session.show_preview = lambda result, _f=session.show_preview: (
        _f(result), shown.__setitem__(0, time.perf_counter())
    )[0]

    def until(condition, timeout=60.0) -> None:
        loop, timer, end = QEventLoop(), QTimer(), time.monotonic() + timeout
        timer.timeout.connect(lambda: loop.quit() if condition() or time.monotonic() > end else None)
        timer.start(2)
        loop.exec_()
        timer.stop()
        if not condition():
            raise TimeoutError("the viewer did not finish in time")

    def click(y: float, x: float) -> float:
        spent.update(segment=0.0, show=0.0)
        shown[0] = 0.0
        t = time.perf_counter()
        session.points_layer.add(np.array([[0, y, x]]))
        until(lambda: session.preview_is_current() and not widget._preview_running and shown[0]
              and draws[-1] > shown[0])
        if os.environ.get("NAPARI_SAM_BENCH_VERBOSE"):
            print({k: round(v, 1) for k, v in spent.items()}, round((draws[-1] - t) * 1000, 1), flush=True)
        return (draws[-1] - t) * 1000

    latencies, corrections, parts = [], [], {"segment": [], "show": []}
    for i in rng.choice(ids, size=args.clicks, replace=False):
        obj = plane_labels == i
        x, y = interior_point(obj)
        latencies.append(click(y, x))
        for k in parts:
            parts[k].append(spent[k])
        # a second point on the object refines the first answer (mask prompt route)
        ys, xs = np.nonzero(obj)
        far = int(np.argmax((ys - y) ** 2 + (xs - x) ** 2))
        corrections.append(click((ys[far] + y) / 2, (xs[far] + x) / 2))
        session.clear_prompts()
        until(lambda: not widget.workers.busy and not widget._preview_running)
    med = {k: statistics.median(v) for k, v in parts.items()}
    emit(what="click_to_preview_ms", model=args.model, slice=[1024, 1024], threads=torch.get_num_threads(),
         median=round(statistics.median(latencies), 1), min=round(min(latencies), 1), max=round(max(latencies), 1),
         segment_median=round(med["segment"], 1), show_median=round(med["show"], 1),
         overhead_median=round(
             statistics.median([a - b - c for a, b, c in zip(latencies, parts["segment"], parts["show"])]), 1
         ))
    emit(what="correction_to_preview_ms", model=args.model, slice=[1024, 1024], threads=torch.get_num_threads(),
         median=round(statistics.median(corrections), 1), min=round(min(corrections), 1),
         max=round(max(corrections), 1))

    def frame_lateness(seconds: float) -> list[float]:
        late = []
        last = [time.perf_counter()]

        def tick():
            now = time.perf_counter()
            late.append((now - last[0]) * 1000)
            last[0] = now

        timer = QTimer()
        timer.setInterval(16)
        timer.timeout.connect(tick)
        timer.start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.002)
        timer.stop()
        return late[1:]

    for condition in ("idle", "embedding"):
        if condition == "embedding":
            widget.run_embedding(current=False)
        intervals = frame_lateness(args.seconds)
        emit(what="frame_interval_ms", condition=condition, model=args.model, target=16,
             median=round(statistics.median(intervals), 1), p95=round(float(np.percentile(intervals, 95)), 1),
             max=round(max(intervals), 1), frames=len(intervals))
    widget.workers.cancel()
    wait(lambda: not widget.workers.busy)
    viewer.close()


if __name__ == "__main__":
    main()
