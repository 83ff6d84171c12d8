"""How a long command stops when asked: after its step in progress, keeping what it did."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

__all__ = ["first_interrupt_stops"]


@contextlib.contextmanager
def first_interrupt_stops(message: str):
    """An event the first Ctrl-C (or SIGTERM, SIGHUP) sets, printing ``message`` and keeping
    the signal's number as ``signum``, for a loop to end at its next step and keep what it
    did; a second one interrupts as usual."""
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield pressed
        return

    def handler(signum, frame):
        if pressed.is_set():
            raise KeyboardInterrupt
        pressed.signum = signum  # the exit status says which signal stopped the run
        pressed.set()
        try:
            print(message, file=sys.stderr, flush=True)
        except OSError:  # a closed terminal takes no more output; the run still saves
            pass

    # A cluster's time limit (SIGTERM) and a closed terminal (SIGHUP) end the run as the
    # first Ctrl-C does: what was learned is saved and --resume continues it.
    caught = [sig for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
              if sig is not None]
    # a signal already ignored stays so: nohup keeps a run going after the terminal closes
    previous = {sig: signal.signal(sig, handler) for sig in caught if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield pressed
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
