"""The ``napari-sam`` command line.

    napari-sam models
    napari-sam segment IMAGE --model NAME_OR_CHECKPOINT --point X Y [--box X0 Y0 X1 Y1] --out labels.tif
    napari-sam embed IMAGE --model NAME_OR_CHECKPOINT --out CACHE.zarr [--axes ZYX] [--scheduler local:2]
    napari-sam info CACHE.zarr [--verify] [--json]
    napari-sam caches [--older-than DAYS] [--max-size GB] [--dry-run] [--json]

Coordinates are pixels of the image as (x, y), that is (column, row).

Errors: a mistake in what was asked (a path, a plane, a channel, prompts, a model, an
output) ends with one line, ``napari-sam <command>: error: <what and which>``, and exit
status 2. Anything else is a bug: its traceback is printed with the version and a request
to report it, and the exit status is 1. ``info --verify`` exits with 3 when it finds a
damaged tile; Ctrl-C ends a command with 130, SIGTERM with 143 and SIGHUP with 129.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import signal
import sys
import threading
import traceback
import warnings

__all__ = ["UsageError", "main", "is_user_error"]


class UsageError(ValueError):
    """A request the command line refuses; its message names the option or file at fault."""


_OS_USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EEXIST,
                   errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}
"""OSError numbers that describe the user's files or disk, not a fault of the program."""


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` reports a mistake in the request (one line) rather than a bug (traceback).

    Bad values are ValueErrors throughout the package (unknown model names, unreadable
    checkpoints and malformed JSON included); files are OSErrors with a number that
    describes the file system; a failed download is a ``CheckpointDownloadError``.
    """
    from ..weights import CheckpointDownloadError

    if isinstance(err, (ValueError, CheckpointDownloadError)):  # JSONDecodeError, CheckpointError, ...
        return True
    return isinstance(err, OSError) and err.errno in _OS_USER_ERRNOS or isinstance(
        err, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError))


def _one_line(err: BaseException) -> str:
    if isinstance(err, json.JSONDecodeError):
        text = f"malformed JSON at line {err.lineno} column {err.colno}: {err.msg}"
    elif isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {err.filename}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's time limit) or SIGHUP (a closed terminal), raised where Ctrl-C
    would be, so that every ``finally`` runs: claims on cache tiles are released, partial
    outputs removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


@contextlib.contextmanager
def _terminations_interrupt():
    def handler(signum, frame):
        raise _Terminated(signum)

    wanted = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
        # a signal already ignored stays so: nohup keeps a command going after the terminal closes
        # (None: a handler set outside Python, which cannot be put back, so it is left alone)
        previous = {sig: signal.signal(sig, handler) for sig in wanted
                    if signal.getsignal(sig) not in (signal.SIG_IGN, None)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _let_go_of_interrupted_work(stop: BaseException) -> None:
    """Free what the interrupted step still holds, quietly, once the line that tells how the
    command ended is out. zarr writes through coroutines: a signal that lands between making
    one and running it leaves it unrun, and one that lands while zarr's own thread runs it
    leaves it running there; Python would say so as the command exits, after that line."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
        traceback.clear_frames(stop.__traceback__)
        gc.collect()
    try:
        _settle_zarr_writes()
    except KeyboardInterrupt:  # a second Ctrl-C: the writes are not waited for
        pass


def _settle_zarr_writes(patience: float = 10.0) -> None:
    """Let the writes still running on zarr's event loop end before the command does: at exit
    zarr stops its loop, and a write still pending there is destroyed half done, with a
    message from asyncio. Writes that outlast ``patience`` seconds are cancelled: a batch
    system's SIGKILL follows its SIGTERM within about 30 seconds."""
    import asyncio

    # zarr's own loop, where it has made one (zarr 3 keeps it in a one-item list)
    loop = next(iter(getattr(sys.modules.get("zarr.core.sync"), "loop", None) or [None]))
    if not isinstance(loop, asyncio.AbstractEventLoop) or loop.is_closed() or not loop.is_running():
        return

    async def settle() -> None:
        writes = asyncio.all_tasks() - {asyncio.current_task()}
        if writes:
            _, late = await asyncio.wait(writes, timeout=patience)
            for write in late:
                write.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(settle(), loop).result(timeout=patience + 5)


class _OutputMayBeDropped:
    """stdout (or stderr) that outlives its reader: once a pipe's reader has gone
    (``| head -1``, ``2>&1 | head``), what is printed goes to the null device and the command
    finishes its work (an output file asked for is still written); Python's own print would
    raise mid-run."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()

    def _drop(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from . import cache, learning, registry, segment, share, viewer
    from .parser import build_parser

    args = build_parser().parse_args(argv)
    handlers = {
        "segment": segment.segment,
        "propagate": segment.propagate,
        "embed": cache.embed,
        "info": cache.info,
        "caches": cache.caches,
        "train": learning.train,
        "evaluate": learning.evaluate,
        "annotate": viewer.annotate,
        "models": registry.models,
        "download": registry.download,
        "export": share.export_package,
        "import": share.import_package,
    }
    def warn(message, category, filename, lineno, file=None, line=None):
        # a warning is one line of the command's output, not Python's two with a source line
        print(f"napari-sam {args.command}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    streams = sys.stdout, sys.stderr
    # a closed stdout (None) stays so: print() to None prints nothing
    sys.stdout, sys.stderr = (None if s is None else _OutputMayBeDropped(s) for s in streams)
    # napari's own event loop answers SIGTERM and SIGHUP in the viewer
    stops = contextlib.nullcontext() if args.command == "annotate" else _terminations_interrupt()
    try:
        with warnings.catch_warnings(), stops:
            warnings.showwarning = warn
            warnings.filterwarnings("default", category=UserWarning, module=r"napari_sam\.")  # ours: said, not raised
            return handlers[args.command](args)
    except _Terminated as stop:
        with contextlib.suppress(OSError):  # a closed terminal takes no more output
            print(f"napari-sam {args.command}: stopped by {stop.name}; what was finished is kept", file=sys.stderr)
        _let_go_of_interrupted_work(stop)
        return 128 + stop.signum
    except KeyboardInterrupt as stop:
        print(f"napari-sam {args.command}: interrupted", file=sys.stderr)
        _let_go_of_interrupted_work(stop)
        return 130
    except Exception as err:
        if is_user_error(err):
            print(f"napari-sam {args.command}: error: {_one_line(err)}", file=sys.stderr)
            return 2
        from .. import __version__

        traceback.print_exc()
        print(f"napari-sam {args.command}: internal error in napari-sam {__version__} (python "
              f"{sys.version.split()[0]}): this is a bug; please report it to the developers with the "
              f"traceback above and the command you ran", file=sys.stderr)
        return 1
    finally:
        sys.stdout, sys.stderr = streams
