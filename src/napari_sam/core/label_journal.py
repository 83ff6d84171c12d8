"""The write-ahead note that makes a write into a Zarr label array all or nothing.

Before a :class:`~napari_sam.core.labels.LabelWriter` writes a region, it notes the
region's earlier values beside the array. A process killed between chunks leaves the
note behind, and the next writer opened on the array puts those values back.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .claims import process_alive, process_start

JOURNAL_NAME = ".napari_sam_pending.npz"
"""The note's file name, inside the Zarr array's folder."""

_WRITING: set[str] = set()
"""Notes of the writes this process is making now (another writer of this process, a
second session on the same labels, must not take them for a crash)."""
_WRITING_LOCK = threading.Lock()


@dataclass(frozen=True)
class Note:
    """A write that did not finish: put ``before`` back into ``region`` of ``plane``."""

    plane: tuple[int, ...]
    region: tuple[int, int, int, int]
    before: np.ndarray
    max_id: int
    pid: int
    host: str
    started: int | None


def journal_path(labels) -> Path | None:
    """Where the note of a Zarr array in a local folder goes (None otherwise: numpy arrays
    live and die with the process, and other stores are written as is)."""
    store_path = getattr(labels, "store_path", None)
    root = getattr(getattr(store_path, "store", None), "root", None)
    if store_path is None or root is None:
        return None
    return Path(root) / str(store_path.path) / JOURNAL_NAME


@contextmanager
def noted(path: Path | None, plane, region, before: np.ndarray, max_id: int) -> Iterator[None]:
    """Keep a note of the write made inside; the note is removed when the block ends
    normally. Left by an exception it stays: the caller removes it once the region is
    back as it was, and a reopened writer finishes a roll-back that failed."""
    if path is None:
        yield
        return
    with _WRITING_LOCK:
        _WRITING.add(str(path))
    try:
        write_note(path, plane, region, before, max_id)
        yield
    finally:
        with _WRITING_LOCK:
            _WRITING.discard(str(path))
    path.unlink(missing_ok=True)  # not reached after an exception


def write_note(path: Path, plane, region, before: np.ndarray, max_id: int) -> None:
    """Note that ``region`` of ``plane`` held ``before`` and the largest id was ``max_id``."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with open(tmp, "wb") as f:
        np.savez(f, plane=np.asarray(plane, np.int64).reshape(-1), region=np.asarray(region, np.int64),
                 before=before, max_id=np.int64(max_id), pid=np.int64(os.getpid()),
                 started=np.int64(process_start(os.getpid()) or -1), host=np.str_(socket.gethostname()))
    os.replace(tmp, path)  # the note is whole or absent


def read_note(path: Path) -> Note:
    """The note a write left behind; ValueError when it is damaged."""
    try:
        with np.load(path, allow_pickle=False) as note:
            started = int(note["started"]) if "started" in note.files and int(note["started"]) >= 0 else None
            y0, y1, x0, x1 = (int(i) for i in note["region"])
            return Note(tuple(int(i) for i in note["plane"]), (y0, y1, x0, x1), note["before"],
                        int(note["max_id"]), int(note["pid"]), str(note["host"]), started)
    except Exception as err:  # noqa: BLE001 - any damage means the note was never completed
        # the note is written to a temporary name and renamed, so a damaged one was not
        # finished: no pixel was written after it
        raise ValueError(f"{path} is damaged; remove it to open the labels") from err


def check_writer_gone(path: Path, note: Note) -> None:
    """ValueError unless the process that left ``note`` has ended (on this machine)."""
    if note.host != socket.gethostname():
        raise ValueError(
            f"{path}: a write by process {note.pid} on {note.host} did not finish; "
            "if that process has ended, remove the note to open the labels as they are"
        )
    # Writes of this process are known (_WRITING): a note naming our own pid is a dead
    # process's whose pid we were given.
    if str(path) in _WRITING or (note.pid != os.getpid() and process_alive(note.pid, note.started)):
        # one writer at a time: undoing a write in progress would tear it, and carrying
        # on would overwrite its note with ours
        raise ValueError(f"{path}: process {note.pid} is writing these labels now; close that session first")
