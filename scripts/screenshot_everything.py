"""Take the "Segment everything" screenshot with the shipped default model.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_everything.py

Opens napari with the bundled 2D nuclei sample (held out of the default model's
training), docks the widget, starts it, runs Segment everything in the mode the model
recommends (AIS when it carries an instance decoder) and saves the window to
docs/images/widget_everything.png; prints the mode, the objects found and their AP50
against the sample's labels. With ``--augment`` it ticks "augment" first (AIS with
test-time augmentation) and saves docs/images/widget_everything_augmented.png. With
``--he`` it opens an H&E tile instead (CryoNuSeg TCGA-S4-A8RO from ../shared/data, MIT; one
of the default model's own training images), which the model reads as its haematoxylin
stain, and saves docs/images/widget_everything_he.png.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"


def main() -> None:
    import argparse

    import napari
    import tifffile
    import window_grabs
    from qtpy.QtWidgets import QApplication

    from napari_sam._qt.widget import SamWidget
    from napari_sam.evaluate import instance_scores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--augment", action="store_true", help="tick 'augment' (AIS) before segmenting")
    parser.add_argument("--he", action="store_true", help="an H&E tile instead of the 2D nuclei sample")
    args = parser.parse_args()
    augment = args.augment
    if args.he:
        data = Path(__file__).resolve().parents[2] / "shared" / "data" / "cryonuseg_he_examples"
        image = tifffile.imread(data / "images" / "TCGA-S4-A8RO.tif")
        truth = tifffile.imread(data / "labels" / "TCGA-S4-A8RO.tif")
    else:
        data = Path(__file__).resolve().parents[1] / "src" / "napari_sam" / "_data"
        image = tifffile.imread(data / "nuclei_2d.tif")
        truth = tifffile.imread(data / "nuclei_2d_labels.tif")

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 900)
    if args.he:
        viewer.add_image(image, name="cryonuseg_he", rgb=True)
    else:
        viewer.add_image(image, name="nuclei_2d", colormap="gray")
    widget = SamWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment Anything")
    widget.start_session()
    window_grabs.settle(app, lambda: widget.session is not None)
    session = widget.session
    print(f"status: {widget.status.value}")
    mode = widget.everything_mode.value
    offered = list(widget.everything_mode.choices)
    if augment:
        if not widget.augment.visible:
            raise SystemExit(f"'augment' is offered for AIS only; the model recommends {mode!r}")
        widget.augment.value = True
    widget.everything.clicked()
    window_grabs.settle(app, lambda: "committed" in widget.status.value and not widget.workers.busy)
    viewer.layers.selection.active = session.labels_layer
    name = "widget_everything" + ("_he" if args.he else "") + ("_augmented" if augment else "") + ".png"
    path = window_grabs.grab(app, viewer, OUT / name)
    labels = np.asarray(session.labels_layer.data)
    scores = instance_scores(truth, labels)
    ran = f"{mode!r}{' augmented' if augment else ''}"
    print(f"model {session.annotator.model.source.name}: modes {offered}, ran {ran}: "
          f"{len(np.unique(labels)) - 1} objects, AP50 {scores['ap50']:.3f}, mSA {scores['msa']:.3f}")
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    viewer.close()


if __name__ == "__main__":
    main()
