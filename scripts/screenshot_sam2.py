"""Take the "propagate with SAM 2" screenshot: the dock widget after a propagation.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_sam2.py

Opens napari with ten planes of the GoNuclear volume (../shared/data/gonuclear_3d, as the
tests read it), docks the widget and starts it with the shipped default SAM, clicks one
nucleus on the middle plane and commits it, then propagates it with the small randomised
SAM 2.1 of tests/reference/sam2/sam2_small_seed0 (no real SAM 2 weights can be downloaded
here): its weights are random, so the masks it draws mean nothing; the picture shows the
controls, the status line and where labels are written. Saves the window, showing a plane
the propagation wrote, to docs/images/sam2_propagation.png and prints what was done.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "images"
REFERENCE = REPO / "tests" / "reference" / "sam2" / "sam2_small_seed0"
SHARED = Path(os.environ.get("NAPARI_SAM_SHARED_DIR", REPO.parent / "shared"))
PLANES = slice(40, 50)
NUCLEUS = 28  # a GoNuclear id present on every plane of the crop: where the click goes


def main() -> None:
    import napari
    import tifffile
    import window_grabs
    from qtpy.QtWidgets import QApplication

    from napari_sam._qt.widget import SamWidget
    from napari_sam.core.masks import deepest_pixel, depth
    from napari_sam.core.sam2_models import load_sam2_model
    from napari_sam.model.sam2 import config_from_official

    folder = SHARED / "data" / "gonuclear_3d"
    image = tifffile.imread(next((folder / "images").glob("*.tif")))[PLANES]
    truth = tifffile.imread(next((folder / "labels").glob("*.tif")))[PLANES]
    config = config_from_official(json.loads((REFERENCE / "config.json").read_text()), name=REFERENCE.name)
    sam2 = load_sam2_model(REFERENCE / "weights.pth", device="cpu", config=config)

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 1000)
    viewer.add_image(image, name="GoNuclear (planes 40-49)", colormap="gray", scale=(0.284, 0.127, 0.127))
    widget = SamWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment Anything")
    widget.start_session()
    window_grabs.settle(app, lambda: widget.session is not None)
    viewer.reset_view()  # the plane fitted to the canvas the dock widget left
    session = widget.session

    seed = image.shape[0] // 2
    viewer.dims.set_current_step(0, seed)
    row, col = deepest_pixel(depth(truth[seed] == NUCLEUS))
    session.points_layer.add(np.array([[seed, row, col]]))
    window_grabs.settle(app, lambda: session.preview_is_current() and not widget.workers.busy)
    session.commit()
    window_grabs.settle(app, lambda: session.labels_layer.data[seed].any() and not widget.workers.busy)
    label_id = int(session.labels_layer.data[seed].max())

    widget.tracking.choose(sam2)
    session.labels_layer.selected_label = label_id
    widget.run_propagation()
    window_grabs.settle(app, lambda: not widget.workers.busy)
    status = widget.status.value
    labels = np.asarray(session.labels_layer.data)
    written = np.flatnonzero((labels == label_id).any(axis=(1, 2))).tolist()
    shown = seed + 2 if seed + 2 in written else seed
    viewer.dims.set_current_step(0, shown)
    viewer.layers.selection.active = session.labels_layer
    window_grabs.settle(app, lambda: not widget.workers.busy and not widget._preview_running)
    path = window_grabs.grab(app, viewer, OUT / "sam2_propagation.png")
    print(f"SAM {session.annotator.model.source.name}: object {label_id} committed on plane {seed} "
          f"({int((labels[seed] == label_id).sum())} px); propagated with {session.tracker.name} "
          f"(randomised reference model) to planes {written}; showing plane {shown}")
    print(f"status: {status}")
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    viewer.close()


if __name__ == "__main__":
    main()
