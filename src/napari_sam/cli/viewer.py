"""``napari-sam annotate``: napari with an image and the dock widget (the ``napari`` extra)."""

from __future__ import annotations

import time

__all__ = ["annotate"]


def annotate(args) -> int:
    from .._extras import require
    from . import UsageError

    try:
        require("the viewer", ("napari", "magicgui", "qtpy"), qt=True)
    except ImportError as err:  # a request this installation cannot serve: one line, exit 2
        raise UsageError(str(err)) from None
    import napari

    viewer = napari.Viewer(title="napari-sam")
    if args.image:
        viewer.open(args.image)
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
