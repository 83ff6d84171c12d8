"""The optional parts of the package and the one line that says how to install them.

The core (library, command line, dask workers) needs none of napari, magicgui or Qt; the
viewer plugin (:mod:`napari_sam.layers`, :mod:`napari_sam._qt`, ``napari-sam annotate``)
needs them and comes with the ``napari`` extra. Whether they are present is looked up
without importing them (``importlib.util.find_spec``), so the check costs nothing and
pulls in no Qt.
"""

from __future__ import annotations

import importlib.util

__all__ = ["QT_BINDINGS", "VIEWER_INSTALL", "missing", "require"]

VIEWER_INSTALL = 'pip install "napari-sam-scale[napari]"'
"""The command that installs the viewer plugin's dependencies."""

QT_BINDINGS = ("PyQt5", "PyQt6", "PySide2", "PySide6")
"""The Qt bindings qtpy can use; any one of them will do."""

_ANY_QT = "a Qt binding (" + ", ".join(QT_BINDINGS[:-1]) + f" or {QT_BINDINGS[-1]})"


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails to import, a module without a spec
        return False


def missing(modules: tuple[str, ...], qt: bool = False) -> list[str]:
    """The names among ``modules`` (top-level module names) that are not installed, and
    with ``qt=True`` also "a Qt binding (...)" when none of :data:`QT_BINDINGS` is."""
    absent = [m for m in modules if not _present(m)]
    if qt and not any(_present(b) for b in QT_BINDINGS):
        absent.append(_ANY_QT)
    return absent


def require(what: str, modules: tuple[str, ...], qt: bool = False) -> None:
    """Raise ImportError in one line when ``what`` cannot work here.

    Parameters
    ----------
    what
        The part of the package that needs ``modules``, as the user knows it
        (``"napari_sam.layers"``, ``"napari-sam annotate"``).
    modules
        Top-level module names it imports.
    qt
        Whether it also needs a Qt binding (it opens windows).

    Raises
    ------
    ImportError
        ``<what> needs napari, magicgui (not installed): pip install "napari-sam-scale[napari]"``.
    """
    absent = missing(modules, qt)
    if absent:
        raise ImportError(f"{what} needs {', '.join(absent)} (not installed): {VIEWER_INSTALL}")
