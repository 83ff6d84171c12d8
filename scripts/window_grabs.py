"""Waiting for napari and grabbing its window, shared by the screenshot scripts."""

from __future__ import annotations

import time
from pathlib import Path


def settle(app, condition=lambda: True, timeout: float = 180.0) -> None:
    """Process Qt events until ``condition()`` holds and at least half a second has passed."""
    start = time.monotonic()
    while not condition() or time.monotonic() < start + 0.5:
        if time.monotonic() > start + timeout:
            raise TimeoutError("napari did not finish in time")
        app.processEvents()
        time.sleep(0.01)


def grab(app, viewer, path: Path) -> Path:
    """Save the whole window to ``path`` as a 128-colour PNG (about a quarter of a megabyte)."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from PIL import Image

    settle(app)
    # napari's toasts (here: its PyQt5 deprecation notice) would cover the canvas
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    settle(app)
    viewer.window.screenshot(str(path), canvas_only=False)
    Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)
    return path
