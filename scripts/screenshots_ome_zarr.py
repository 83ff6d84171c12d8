"""Take the screenshots of docs/ome_zarr.md: labels over an OME-Zarr pyramid at two zooms.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshots_ome_zarr.py

Writes a 2048 x 2048 OME-Zarr (NGFF 0.5) made of the bundled 2D nuclei sample, mirrored
into a 4 x 4 mosaic, with ome-zarr-py's writer; opens it with napari-ome-zarr, starts the
widget with "labels into the image's OME-Zarr", commits one click per nucleus in one
quarter of the image with the shipped default model, and grabs the window zoomed out
(napari shows a low pyramid level of both image and labels) and zoomed in (level 0).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"
DATA = Path(__file__).resolve().parents[1] / "src" / "napari_sam" / "_data"


def mosaic(tile: np.ndarray, n: int = 4, labels: bool = False) -> np.ndarray:
    """An n x n mosaic of mirrored copies: seamless, and no copy sits the same way as its
    neighbours; for a label image each copy's ids are made its own."""
    step = int(tile.max()) + 1 if labels else 0

    def copy(i: int, j: int) -> np.ndarray:
        t = tile[::-1] if i % 2 else tile
        t = t[:, ::-1] if j % 2 else t
        return np.where(t > 0, t.astype(np.int64) + (i * n + j) * step, 0) if labels else t

    return np.concatenate([np.concatenate([copy(i, j) for j in range(n)], axis=1) for i in range(n)], axis=0)


def main(out: Path = OUT) -> None:
    import napari
    import tifffile
    import window_grabs
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_image
    from qtpy.QtWidgets import QApplication

    from napari_sam._qt.widget import SamWidget
    from napari_sam.core.prompt_simulation import interior_point

    image = mosaic(tifffile.imread(DATA / "nuclei_2d.tif"))
    truth = mosaic(tifffile.imread(DATA / "nuclei_2d_labels.tif"), labels=True)
    folder = Path(tempfile.mkdtemp(prefix="napari-sam-omezarr-"))
    path = folder / "nuclei_mosaic.ome.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    write_image(image, root, axes="yx", fmt=FormatV05(), storage_options={"chunks": (256, 256)})

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 900)
    viewer.open(str(path), plugin="napari-ome-zarr")
    widget = SamWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment Anything")

    def settle(condition=lambda: True):
        window_grabs.settle(app, condition)

    def grab(name: str) -> None:
        target = window_grabs.grab(app, viewer, out / name)
        print(f"wrote {target} ({target.stat().st_size // 1024} KiB); labels shown at pyramid level "
              f"{widget.session.labels_layer.data_level}, image at level {viewer.layers[0].data_level}")

    widget.ngff_labels.value = True
    widget.start_session()
    settle(lambda: widget.session is not None)
    session = widget.session
    idle = lambda: not widget.workers.busy and not widget._preview_running  # noqa: E731
    # one click per nucleus of the top-left quarter, as a user would annotate a region
    quarter = truth[:1024, :1024]
    ids = [i for i in np.unique(quarter) if i and (quarter == i).sum() > 150]
    for i in ids:
        x, y = interior_point(quarter == i)
        session.points_layer.add(np.array([[y, x]]))
        settle(lambda: session.preview_is_current() and idle())
        widget.commit.clicked()
        # a commit clears the plane's prompts (the undo history is capped, so not counted)
        settle(lambda: idle() and len(session.points_layer.data) == 0)
    print(f"committed {len(ids)} nuclei into {path}/labels/napari-sam")
    viewer.layers.selection.active = session.labels_layer
    viewer.reset_view()
    grab("ome_zarr_zoomed_out.png")
    viewer.scene.camera.center = (512, 512)
    viewer.scene.camera.zoom = 3.0
    grab("ome_zarr_zoomed_in.png")
    viewer.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
