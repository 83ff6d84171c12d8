"""``napari-sam annotate``: napari with an image and the dock widget (the ``napari`` extra)."""

from __future__ import annotations

import os
import sys
import time

__all__ = ["annotate"]


def annotate(args) -> int:
    from .._extras import require
    from . import UsageError

    try:
        require("the viewer", ("napari", "magicgui", "qtpy"), qt=True)
    except ImportError as err:  # a request this installation cannot serve: one line, exit 2
        raise UsageError(str(err)) from None
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) \
            and os.environ.get("QT_QPA_PLATFORM") is None:  # Qt would abort the process
        raise UsageError("no display to open napari on: run it in a desktop session (or under xvfb-run); "
                         "`napari-sam segment` does the same work without a viewer")
    import napari

    from ..core.ngff_image import is_ome_zarr

    viewer = napari.Viewer(title="napari-sam")
    if args.image:
        # an OME-Zarr with label images is claimed by napari's builtin reader too, which cannot read it
        viewer.open(args.image, plugin="napari-ome-zarr" if is_ome_zarr(args.image) else None)
    else:
        viewer.open_sample("napari-sam-scale", args.sample)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-scale", "Segment Anything")
    if args.model:
        widget.choose_model(args.model)
    if args.start:
        widget.start_session()
    if args.screenshot:
        from qtpy.QtWidgets import QApplication

        deadline = time.monotonic() + 60
        while args.start and widget.session is None and time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.05)
        viewer.screenshot(args.screenshot, canvas_only=False)
        viewer.close()
        return 0
    napari.run()
    return 0
