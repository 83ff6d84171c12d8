"""Progress bars for long work outside the viewer: the command line, scripts and Jupyter.

One rule for every bar of the package (embedding, propagation, segment everything,
training, evaluation):

* in a terminal, tqdm's bar redrawn in place; in Jupyter, its notebook widget;
* where stderr is a file or a pipe (a cluster job's log, ``2> log.txt``), one plain line
  at the start, then at most every :data:`LOG_INTERVAL` seconds, and at the end: a redrawn
  bar there is one endless line of carriage returns;
* ``progress=False`` or the environment variable ``TQDM_DISABLE=1`` turn bars off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

__all__ = ["LOG_INTERVAL", "progress_bar"]

LOG_INTERVAL = 30.0
"""Seconds between the lines a bar writes into a log file."""


def progress_bar(iterable: Iterable | None = None, *, progress: bool = True, **kwargs):
    """A tqdm bar (``tqdm.auto``) that follows the rule of the module docstring.

    Parameters
    ----------
    iterable
        Wrapped as tqdm wraps it; None for a bar updated by hand.
    progress
        False: no bar at all.
    **kwargs
        tqdm's own (``total``, ``desc``, ``unit``, ``initial``, ...).

    Returns
    -------
    tqdm.tqdm
        The bar (a context manager; iterate it when ``iterable`` is given).
    """
    from tqdm.auto import tqdm

    disable = not progress or os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")
    # tqdm.auto's class in Jupyter is defined in tqdm.auto but derives from the notebook bar
    notebook = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)
    if not disable and not notebook and not _is_terminal(sys.stderr):
        kwargs = {"file": _LogLines(sys.stderr), "mininterval": LOG_INTERVAL, "ascii": True, **kwargs}
    return tqdm(iterable, disable=disable, **kwargs)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed, or not a real file
        return False


class _LogLines:
    """A stream that turns tqdm's in-place redraws into whole lines."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        for line in text.replace("\r", "\n").split("\n"):
            if line.strip():
                self._stream.write(line.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        self._stream.flush()
