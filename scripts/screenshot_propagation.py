"""Take the "propagate all labels" screenshots with the shipped default model.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_propagation.py

Opens napari with the bundled 3D nuclei sample (the GoNuclear crop, held out of the
default model's training) at its voxel size, docks the widget and starts it with the
default model, draws the box of every nucleus of more than 80 pixels on the middle plane
(eight; at most twelve; ``--click``: clicks their middle instead) and commits each, then
presses "Propagate all labels" (SAM re-prompting with the default settings). Saves the
window twice to docs/images/: the middle plane (``propagation_plane.png``) and the X-Z
cut through the object that reached over the most planes (``propagation_xz.png``), each
with the ground truth drawn as outlines beside the committed labels, and prints the mean
3D IoU per object.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"
DATA = Path(__file__).resolve().parents[1] / "src" / "napari_sam" / "_data"
SCALE = (0.284, 0.127, 0.127)  # GoNuclear's voxel size, ZYX, in micrometres


def _clicks(truth: np.ndarray, seed: int, count: int = 12) -> list[int]:
    """Ids of the nuclei of more than 80 pixels on the seed plane (at most ``count``),
    nearest its middle row first."""
    ids = [i for i in np.unique(truth[seed]) if i and (truth[seed] == i).sum() > 80]
    rows = {i: np.argwhere(truth[seed] == i)[:, 0].mean() for i in ids}
    middle = truth.shape[1] / 2
    return sorted(ids, key=lambda i: abs(rows[i] - middle))[:count]


def main() -> None:
    import argparse

    import napari
    import tifffile
    import window_grabs
    from qtpy.QtWidgets import QApplication

    from napari_sam._qt.widget import SamWidget
    from napari_sam.core.masks import deepest_pixel, depth

    parser = argparse.ArgumentParser()
    parser.add_argument("--click", action="store_true", help="seed each nucleus with a click, not its box")
    args = parser.parse_args()
    image = tifffile.imread(DATA / "nuclei_3d.tif")
    truth = tifffile.imread(DATA / "nuclei_3d_labels.tif")
    seed = image.shape[0] // 2

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 1000)
    viewer.add_image(image, name="nuclei_3d", colormap="gray", scale=SCALE)
    gt = viewer.add_labels(truth, name="ground truth (outlines)", scale=SCALE, opacity=0.9)
    gt.contour = 1
    widget = SamWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment Anything")
    widget.start_session()
    window_grabs.settle(app, lambda: widget.session is not None)
    session = widget.session
    viewer.reset_view()
    viewer.dims.set_current_step(0, seed)

    clicked = _clicks(truth, seed)
    for k, i in enumerate(clicked):
        if args.click:
            row, col = deepest_pixel(depth(truth[seed] == i))
            session.points_layer.add(np.array([[seed, row, col]]))
        else:
            rows, cols = np.nonzero(truth[seed] == i)
            y0, y1, x0, x1 = rows.min(), rows.max(), cols.min(), cols.max()
            corners = [[seed, y0, x0], [seed, y0, x1], [seed, y1, x1], [seed, y1, x0]]
            session.boxes_layer.add(np.array(corners, dtype=float), shape_type="rectangle")
        window_grabs.settle(app, lambda: session.preview_is_current() and not widget.workers.busy)
        session.commit()
        window_grabs.settle(app, lambda k=k: len(np.unique(session.labels_layer.data[seed])) > k + 1
                            and not widget.workers.busy)
    widget.tracking.run_all()
    window_grabs.settle(app, lambda: not widget.workers.busy)
    print(f"status: {widget.status.value}")

    labels = np.asarray(session.labels_layer.data)
    scores = []
    for label_id in np.unique(labels[seed])[1:]:
        mask = labels == label_id
        best = np.bincount(truth[mask]).argmax()
        if best == 0:
            continue
        target = truth == best
        scores.append((mask & target).sum() / (mask | target).sum())
        planes = np.flatnonzero(mask.any(axis=(1, 2)))
        true_planes = np.flatnonzero(target.any(axis=(1, 2)))
        print(f"label {label_id} -> nucleus {best}: planes {planes.min()}-{planes.max()} "
              f"(truth {true_planes.min()}-{true_planes.max()}), 3D IoU {scores[-1]:.2f}")
    print(f"{len(scores)} objects, mean 3D IoU {np.mean(scores):.3f}")

    viewer.layers.selection.active = session.labels_layer
    session.labels_layer.opacity = 0.5
    window_grabs.settle(app, lambda: not widget.workers.busy and not widget._preview_running)
    suffix = "_click" if args.click else ""
    path = window_grabs.grab(app, viewer, OUT / f"propagation_plane{suffix}.png")
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")

    # the X-Z cut: rows become the slider, Z runs down the canvas
    # through the middle of the object that reaches over most planes
    tallest = max(np.unique(labels[seed])[1:], key=lambda j: (labels == j).any(axis=(1, 2)).sum())
    row = int(round(np.argwhere(labels[seed] == tallest)[:, 0].mean()))
    viewer.dims.order = (1, 0, 2)
    viewer.dims.set_current_step(1, row)
    viewer.reset_view()
    window_grabs.settle(app, lambda: not widget.workers.busy and not widget._preview_running)
    path = window_grabs.grab(app, viewer, OUT / f"propagation_xz{suffix}.png")
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB), X-Z cut at row {row}")
    viewer.close()


if __name__ == "__main__":
    main()
