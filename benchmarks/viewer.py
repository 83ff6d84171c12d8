"""Interactive latency of the napari plugin, measured in a real viewer (run under Xvfb).

    xvfb-run -a python benchmarks/viewer.py [--model vit_b] [--clicks 10]

Prints one JSON object per line:

* ``click_to_preview_ms``: from a point added to the "SAM points" layer to the preview
  layer holding the new mask, on a 1024 x 1024 slice whose embedding is cached, through
  the widget's thread worker and the Qt event loop (what a user waits for);
* ``frame_interval_ms``: how late a 60 Hz Qt timer fires (the viewer's frame budget),
  idle and while the widget embeds slices in its worker. micro-sam had to turn its
  workers off because they slowed napari down; this shows whether ours do.

The model has random weights (timing does not depend on them); ``--model`` picks its
architecture.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np


def emit(**record) -> None:
    print(json.dumps({"impl": "napari_sam", **record}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_b", choices=["vit_b", "vit_t", "vit_l", "vit_h"])
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=8.0, help="frame sampling per condition")
    args = ap.parse_args()

    import napari
    import torch
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_sam._qt.widget import SamWidget
    from napari_sam.model import build_sam

    scratch = tempfile.mkdtemp(prefix="napari-sam-viewer-bench-")
    ckpt = os.path.join(scratch, f"{args.model}_random.pth")
    torch.manual_seed(0)
    torch.save(build_sam(args.model).state_dict(), ckpt)
    os.environ["NAPARI_SAM_MODEL"] = ckpt
    os.environ.setdefault("NAPARI_SAM_CACHE_DIR", scratch)

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    rng = np.random.default_rng(0)
    volume = (rng.random((4, 1024, 1024)) * 4000).astype(np.uint16)
    viewer.add_image(volume, name="volume")
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
    wait(lambda: not widget._workers)

    latencies = []
    for i in range(args.clicks):
        x, y = rng.uniform(100, 900, 2)
        session.points_layer.add(np.array([[0, y, x]]))
        t = time.perf_counter()
        wait(lambda: session.preview_is_current() and not widget._workers and not widget._preview_running)
        latencies.append((time.perf_counter() - t) * 1000)
        session.clear_prompts()
        wait(lambda: not widget._workers and not widget._preview_running)
    emit(what="click_to_preview_ms", model=args.model, slice=[1024, 1024], threads=torch.get_num_threads(),
         median=round(statistics.median(latencies), 1), min=round(min(latencies), 1), max=round(max(latencies), 1))

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
    widget.cancel_embedding()
    wait(lambda: not widget._workers)
    viewer.close()


if __name__ == "__main__":
    main()
