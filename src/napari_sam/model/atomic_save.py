"""Files written whole or not at all: a checkpoint (or a run's state) is saved under a
temporary name beside its place and renamed over it once complete, and a disk that fills
on the way is said as such."""

from __future__ import annotations

import os

import torch

__all__ = ["save_whole"]


def save_whole(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file beside ``path``, renamed over it once whole,
    so that a reader (a resumed run) never meets half a file.

    Raises
    ------
    OSError
        With the file system's own errno (ENOSPC, EDQUOT), naming ``path``, when the disk
        or the quota filled (torch reports it as a RuntimeError).
    """
    target = os.fspath(path)
    tmp = f"{target}.partial-{os.getpid()}"
    try:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:
            # torch reports a failed write as its own error: a probe, written while the partial
            # file still holds what the disk (or the user's quota) had left, says why
            refused = _write_refused(os.path.dirname(os.path.abspath(target)))
            if refused is not None:
                raise OSError(refused.errno, refused.strerror, target) from err
            raise
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_refused(folder: str) -> OSError | None:
    """The error writing a MiB into ``folder`` gives (a full disk, a spent quota), or None."""
    fd, probe = None, os.path.join(folder, f".napari-sam-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        left = memoryview(bytes(1 << 20))
        while left:  # a short write is what a nearly full disk gives first; the next one fails
            left = left[os.write(fd, left):]
        os.fsync(fd)
        return None
    except OSError as err:
        return err
    finally:
        if fd is not None:
            os.close(fd)
        if os.path.exists(probe):
            os.remove(probe)
