"""Folders built under a hidden staging name and renamed into place.

A folder (a Zarr group) cannot be written in one step: it is built in a staging folder
beside its target and renamed in, so the target's name holds the old folder or the new
one, whole. The staging folder's name records who made it (host, process id and start
time), so a later writer can tell a dead writer's leftovers from a live writer's work,
remove them, and put back an old folder that a kill left moved aside.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

from .claims import process_alive, process_start

__all__ = ["clean_staging", "make_staging", "swap_in"]

PREFIX = ".napari-sam-staging"
_ASIDE = ".old."


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def make_staging(folder: Path) -> Path:
    """A new staging folder in ``folder``: ``.napari-sam-staging.<host>.<pid>.<start>.<random>``."""
    pid = os.getpid()
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}.{_host_tag()}.{pid}.{process_start(pid) or -1}.", dir=folder))


def swap_in(staging: Path, name: str, replace: bool = False) -> None:
    """Rename ``staging/name`` to ``name`` in the staging folder's parent, replacing a folder
    there only when ``replace`` is true (else FileExistsError: one may have appeared, or been
    put back by :func:`clean_staging`, since the caller looked).

    The old folder moves aside into the staging folder first (a folder cannot be replaced
    by one rename); only between the two renames is the name empty. A failure of the
    second rename puts the old one back; a kill there leaves it in the staging folder,
    where :func:`clean_staging` finds it.
    """
    target = staging.parent / name
    old = None
    if target.exists() or target.is_symlink():
        if not replace:
            raise FileExistsError(f"{target} exists (it appeared while napari-sam was writing it): nothing was "
                                  "replaced")
        old = staging / f"{_ASIDE}{name}"
        os.replace(target, old)
    try:
        os.replace(staging / name, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise


def clean_staging(folder: Path) -> None:
    """Remove the staging folders that dead writers of this host left in ``folder``.

    A folder found moved aside in one (see :func:`swap_in`) goes back to its name when
    that name is empty: the replacement was cut short, so the old one stays.
    """
    for entry in folder.glob(f"{PREFIX}.*"):
        parts = entry.name[len(PREFIX) + 1:].split(".")
        try:
            host, pid, started = parts[0], int(parts[1]), int(parts[2])
        except (IndexError, ValueError):
            continue
        if host != _host_tag() or process_alive(pid, started if started >= 0 else None):
            continue  # another machine's writer, or a live one: not ours to judge
        for old in entry.glob(f"{_ASIDE}*"):
            target = folder / old.name[len(_ASIDE):]
            if not target.exists() and not target.is_symlink():
                os.replace(old, target)
        shutil.rmtree(entry, ignore_errors=True)
