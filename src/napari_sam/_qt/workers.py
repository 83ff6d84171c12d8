"""The one place where long work becomes napari thread workers, for both dock widgets.

The work itself is plain Python in the headless layers: a function, or a generator that
yields progress (anything with ``done`` and ``total``, or what ``progress_of`` reads from
it) and returns its result, as the console and the command line drive it too. Here it
runs in a napari thread worker, so the viewer keeps drawing; a napari progress bar
follows it; Cancel quits it (a generator stops at its next ``yield``, keeping what it
finished); and every callback that touches widgets is dropped once the widget is gone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from napari.qt.threading import create_worker
from napari.utils import progress

__all__ = ["WorkFailed", "Workers", "error_text"]


class WorkFailed(Exception):
    """A RuntimeError raised by a generator's work (every torch error is one: out of
    memory, a full disk), raised again as another type. superqt's generator workers take a
    RuntimeError for a sign that the worker was deleted and end without a word: neither
    ``errored`` nor ``finished``, so the widget would wait for the work for ever."""


def error_text(err: BaseException, limit: int = 200) -> str:
    """A failed step's error in one status line: the first line of its message, cut at
    ``limit`` characters (a download's chain of errors runs to several hundred)."""
    first = (str(err) or type(err).__name__).strip().splitlines()[0]
    return "error: " + (first if len(first) <= limit else first[: limit - 3] + "...")


class Workers:
    """The thread workers of one dock widget.

    Parameters
    ----------
    say
        Shows one line of status to the user (called on the GUI thread).
    """

    def __init__(self, say: Callable[[str], None]):
        self._say = say
        self._running: set = set()
        self._cancellable = None
        self.closed = False
        self.cancel_changed: Callable[[bool], None] = lambda running: None
        """Called with True when cancellable work starts and False when it ends (the
        widget enables its Cancel button)."""

    @property
    def busy(self) -> bool:
        """Whether any worker is still running."""
        return bool(self._running)

    def running(self, worker) -> bool:
        """Whether ``worker`` (one this object started) is still running."""
        return worker in self._running

    def gui(self, fn: Callable) -> Callable:
        """Wrap a callback that touches widgets: workers report after the viewer may have
        closed, when Qt has already deleted the widgets (PyQt then raises RuntimeError)."""

        def call(*args):
            if self.closed:
                return None
            try:
                return fn(*args)
            except RuntimeError as err:
                if "deleted" not in str(err):
                    raise
                self.close()
                return None

        return call

    def say(self, text: str) -> None:
        """Show a status line, unless the widget is gone."""
        self.gui(self._say)(text)

    def close(self) -> None:
        """Quit every worker (the widget is closing)."""
        self.closed = True
        for worker in list(self._running):
            worker.quit()

    @staticmethod
    def make(fn: Callable, *args):
        """A napari thread worker for ``fn(*args)``, not started: every worker of the widgets
        is made here, so that its errors reach :meth:`start`'s handler alone (napari would
        otherwise raise them again into a notification)."""
        return create_worker(fn, *args, _start_thread=False, _ignore_errors=True)

    def start(self, worker, done: Callable | None = None, failed: Callable | None = None):
        """Start a worker; ``done`` gets its result and ``failed`` its exception on the GUI
        thread (default for failures: the status line says the error). Make it with :meth:`make`."""
        self._running.add(worker)
        worker.finished.connect(lambda: self._running.discard(worker))
        if done is not None:
            worker.returned.connect(self.gui(done))
        worker.errored.connect(self.gui(failed) if failed is not None else (lambda err: self.say(error_text(err))))
        worker.start()
        return worker

    def call(self, fn: Callable, done: Callable | None = None, label: str = ""):
        """``fn()`` in a worker, its result to ``done``: the ``run`` of a
        :class:`~napari_sam.layers.ViewerSession`."""
        if label:
            self.say(label + "...")
        return self.start(self.make(fn), done)

    def steps(
        self,
        fn: Callable,
        *args,
        desc: str,
        show: Callable[[Any], None] | None = None,
        done: Callable | None = None,
        cancelled: str = "",
        progress_of: Callable[[Any], tuple[int, int]] = lambda p: (p.done, p.total),
        failed: Callable | None = None,
        ended: Callable[[], None] | None = None,
    ):
        """Drive the generator ``fn(*args)`` in a worker with a progress bar and Cancel.

        Parameters
        ----------
        fn, args
            A function returning a generator, and its arguments (called in the worker).
        desc
            The progress bar's label.
        show
            Gets each yielded item on the GUI thread (after the bar moved).
        done
            Gets the generator's return value on the GUI thread.
        cancelled
            Status line shown when the user cancels.
        progress_of
            (done, total) of a yielded item.
        failed
            Gets an exception raised by the work (default: the status line says it).
        ended
            Called on the GUI thread when the work ends, however it ends, before
            :attr:`busy` turns False: what it re-enables is ready once the widget is idle.
        """
        bar = progress(total=0, desc=desc)

        def step(item):
            bar.n, bar.total = progress_of(item)
            bar.refresh()
            if show is not None:
                show(item)

        made = []

        def work():
            # napari picks a generator worker for generator functions only; ``fn`` may be
            # a plain function returning a generator.
            made.append(fn(*args))
            try:
                return (yield from made[0])
            except RuntimeError as err:
                raise WorkFailed(str(err) or type(err).__name__) from err

        def close():
            # A cancelled worker leaves its generator suspended, not closed: its cleanup (the
            # undo step a propagation writes into) would wait for the garbage collector.
            for gen in made:
                gen.close()

        worker = self.make(work)
        worker.yielded.connect(self.gui(step))
        worker.finished.connect(close)
        worker.finished.connect(bar.close)
        worker.finished.connect(self.gui(lambda: self._ended(worker)))
        if ended is not None:
            worker.finished.connect(self.gui(ended))
        if cancelled:
            worker.aborted.connect(lambda: self.say(cancelled))
        self._cancellable = worker
        self.cancel_changed(True)
        return self.start(worker, done, failed)

    def _ended(self, worker) -> None:
        if self._cancellable is worker:
            self._cancellable = None
            self.cancel_changed(False)

    def cancel(self) -> None:
        """Stop the running cancellable work (what it finished stays)."""
        if self._cancellable is not None:
            self._cancellable.quit()
