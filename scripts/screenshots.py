"""Take the screenshots of docs/annotating.md with the shipped default model.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshots.py

Opens napari with the bundled 2D nuclei sample (held out of the default model's
training), docks the widget, and saves three window grabs to docs/images/: the widget
before Start, a click with its preview, and the slice after several commits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"


def main() -> None:
    import napari
    import tifffile
    import window_grabs
    from qtpy.QtWidgets import QApplication

    from napari_sam._qt.widget import SamWidget
    from napari_sam.core.prompt_simulation import interior_point

    data = Path(__file__).resolve().parents[1] / "src" / "napari_sam" / "_data"
    image = tifffile.imread(data / "nuclei_2d.tif")
    truth = tifffile.imread(data / "nuclei_2d_labels.tif")

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 900)
    viewer.add_image(image, name="nuclei_2d", colormap="gray")
    widget = SamWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment Anything")

    def settle(condition=lambda: True):
        window_grabs.settle(app, condition)

    def grab(name: str) -> None:
        path = window_grabs.grab(app, viewer, OUT / name)
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")

    settle()
    grab("widget_start.png")

    widget.start_session()
    settle(lambda: widget.session is not None)
    session = widget.session
    idle = lambda: not widget.workers.busy and not widget._preview_running  # noqa: E731
    ids = [i for i in np.unique(truth) if i and (truth == i).sum() > 150]
    rng = np.random.default_rng(1)
    chosen = rng.choice(ids, size=12, replace=False)
    # the preview screenshot shows the click nearest the middle, where it is easy to see
    centre = np.array(truth.shape) / 2
    chosen = sorted(chosen, key=lambda i: np.linalg.norm(np.argwhere(truth == i).mean(axis=0) - centre))
    for k, i in enumerate(chosen):
        x, y = interior_point(truth == i)
        session.points_layer.add(np.array([[y, x]]))
        settle(lambda: session.preview_is_current() and idle())
        if k == 0:
            grab("widget_preview.png")
        widget.commit.clicked()
        settle(lambda k=k: len(np.unique(session.labels_layer.data)) > k + 1 and idle())
    viewer.layers.selection.active = session.labels_layer
    grab("widget_committed.png")
    labels = np.asarray(session.labels_layer.data)
    pieces = {int(i): ndimage.label(labels == i, structure=np.ones((3, 3)))[1] for i in np.unique(labels) if i}
    inside = {int(i): int((ndimage.binary_fill_holes(labels == i) & (labels != i)).sum()) for i in pieces}
    print(f"committed {len(pieces)} objects; pieces per object: {sorted(pieces.values())}; "
          f"pixels of holes or other objects inside each: {sorted(inside.values())}")
    viewer.close()


if __name__ == "__main__":
    main()
