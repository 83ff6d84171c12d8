"""Claims on embedding-cache entries, so that several writers of one cache share the work.

Before computing a missing tile, a writer claims it by creating a small file named after
the entry (``<plane>.<row>.<col>``) in ``<cache>/<key>/checksums/claims/``, with
``O_CREAT | O_EXCL``: of several writers, exactly one succeeds. The file holds the
writer's pid, host name, process start time and the time of the claim; the writer
deletes it once the tile is stored (or abandoned). The claims live inside the checksums
array's folder because Zarr ignores files there, while it warns about unknown files
beside its groups.

A claim is stale, and another writer may take it over, when

* its process is gone: on the same host, the pid no longer exists, is a zombie, or is a
  different process started later (pid reuse, seen through ``/proc``);
* or it is older than ``timeout`` (the only test for a writer on another host);
* or it cannot be read and is older than a few seconds (a writer killed between
  creating the file and writing it).

A takeover renames the stale file to a unique name first, so that of two writers taking
over the same claim only one wins, and checks that what it renamed is the claim it judged
stale. Claims only share work: correctness never depends on them, because every entry is
written atomically by :class:`~napari_sam.core.embedding_store.EmbeddingStore` and two
writers computing one tile write the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["CLAIM_TIMEOUT", "Claim", "Entry", "TileClaims", "cache_lock", "claims_folder"]

CLAIM_TIMEOUT = 900.0  # s: a tile of the largest model on a slow CPU takes well under this
_UNREADABLE_GRACE = 10.0  # s: writing a claim's few bytes takes microseconds
_TOMB = ".stale-"

Entry = tuple[int, int, int]  # (flat plane, tile row, tile column)


@contextlib.contextmanager
def cache_lock(cache: str | os.PathLike | None) -> Iterator[None]:
    """Hold an exclusive lock on a cache folder (created, empty, if missing) while opening it.

    Two writers opening a new cache at once would both create its signature's group, and
    one may delete the other's half-made group as left by a crash. An ``flock`` on the
    folder serialises the opening; the system drops it when its process dies, so it never
    goes stale. Where it cannot be taken (no folder can be made, no ``flock`` on this
    system or file system), nothing is locked and opening reports its own error, if any.
    """
    if cache is None:
        yield
        return
    path = Path(cache).expanduser()
    fd = None
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY)
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
    except (OSError, ImportError):
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def claims_folder(cache: str | os.PathLike, key: str) -> Path:
    """Where the claims on the entries of signature ``key`` in ``cache`` live."""
    return Path(cache).expanduser() / key / "checksums" / "claims"


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its end.
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def _process_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:][:1] or None


def process_alive(pid: int, started: int | None) -> bool:
    """Whether process ``pid`` of this host runs, and is the one that started at ``started``
    (its start time from /proc, when known): a reused pid or a zombie counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process, but it exists
    except OSError:
        return True  # cannot tell: let the timeout decide
    if _process_state(pid) in ("Z", "X"):
        return False  # killed, not yet reaped by its parent
    if started is not None:
        now = process_start(pid)
        if now is not None and now != started:
            return False  # the pid was reused by a later process
    return True


@dataclass(frozen=True)
class Claim:
    """Who claimed an entry, and when.

    Attributes
    ----------
    pid, host
        The writer's process id and host name.
    started
        The writer's process start time (clock ticks since boot, Linux), to tell a reused
        pid from the writer; None where unknown.
    time
        When the claim was made (``time.time()``).
    token
        Unique per claim: tells this claim from a later one on the same entry.
    """

    pid: int
    host: str
    started: int | None
    time: float
    token: str

    @classmethod
    def mine(cls) -> "Claim":
        """A new claim by this process, now."""
        pid = os.getpid()
        return cls(pid, socket.gethostname(), process_start(pid), time.time(), uuid.uuid4().hex)

    def stale(self, timeout: float = CLAIM_TIMEOUT) -> bool:
        """Whether the claim's writer is gone (same host) or the claim is older than
        ``timeout`` seconds."""
        if time.time() - self.time > timeout:
            return True
        if self.host == socket.gethostname():
            return not process_alive(self.pid, self.started)
        return False


class TileClaims:
    """Claims on the entries of one signature in an on-disk cache.

    Parameters
    ----------
    folder
        The claims folder (:func:`claims_folder`); created when the first claim is made.
    timeout
        Seconds after which any claim counts as stale, whatever its process.

    Examples
    --------
    >>> claims = TileClaims(claims_folder("cache.zarr", key))      # doctest: +SKIP
    >>> if claims.acquire((0, 1, 2)):                               # doctest: +SKIP
    ...     try: compute_and_store((0, 1, 2))
    ...     finally: claims.release((0, 1, 2))
    """

    def __init__(self, folder: str | os.PathLike, timeout: float = CLAIM_TIMEOUT):
        self.folder = Path(folder)
        self.timeout = timeout
        self.held: dict[tuple[int, int, int], Claim] = {}

    def path(self, entry: tuple[int, int, int]) -> Path:
        """The claim file of an entry."""
        return self.folder / ".".join(str(int(i)) for i in entry)

    def holder(self, entry: tuple[int, int, int]) -> Claim | None:
        """The claim on an entry, or None when unclaimed (or unreadable)."""
        return _read(self.path(entry))

    def acquire(self, entry: tuple[int, int, int]) -> bool:
        """Claim an entry: True when this writer now holds it (it was free, or its claim
        was stale and is taken over), False when another live writer holds it."""
        if entry in self.held:
            return True
        path = self.path(entry)
        for _ in range(8):  # each turn either claims, or finds a live claim, or loses a race
            if self._create(entry, path):
                return True
            current = _read(path)
            if current is None:
                if not path.exists():
                    continue  # released meanwhile: try again
                if not _older_than(path, _UNREADABLE_GRACE):
                    return False  # being written right now
            elif not current.stale(self.timeout):
                return False
            if not self._remove_stale(path, current):
                return False
        return False

    def release(self, entry: tuple[int, int, int]) -> None:
        """Give an entry's claim up (after storing it, or when abandoning it). A claim
        taken over by another writer meanwhile is left to it."""
        mine = self.held.pop(entry, None)
        if mine is None:
            return
        path = self.path(entry)
        current = _read(path)
        if current is not None and current.token == mine.token:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def release_all(self) -> None:
        """Release every claim this object holds."""
        for entry in list(self.held):
            self.release(entry)

    def sweep(self) -> None:
        """Remove the claims of writers that are gone, and what a takeover killed midway
        left, so that a finished cache holds no claims: a writer killed after storing a
        tile but before releasing it leaves a claim that no later run would otherwise
        look at (the tile is not missing)."""
        for path in self.present():
            if _TOMB in path.name:
                path.unlink(missing_ok=True)  # a live taker reads its own before this: at worst it waits
                continue
            claim = _read(path)
            stale = _older_than(path, _UNREADABLE_GRACE) if claim is None else claim.stale(self.timeout)
            if stale:
                self._remove_stale(path, claim)

    def live(self) -> list[Path]:
        """The claim files of writers still at work (changes nothing; :meth:`sweep` removes
        the others). An unreadable claim counts as live for its first seconds only."""
        out = []
        for path in self.present():
            if _TOMB in path.name:
                continue
            claim = _read(path)
            stale = _older_than(path, _UNREADABLE_GRACE) if claim is None else claim.stale(self.timeout)
            if not stale:
                out.append(path)
        return out

    def present(self) -> list[Path]:
        """The claim files in the folder (any writer's, stale or not)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    # -- internals ---------------------------------------------------------------------
    def _create(self, entry: tuple[int, int, int], path: Path) -> bool:
        claim = Claim.mine()
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
        except FileExistsError:
            return False
        try:
            os.write(fd, json.dumps(asdict(claim)).encode())
        finally:
            os.close(fd)
        self.held[entry] = claim
        return True

    def _remove_stale(self, path: Path, judged: Claim | None) -> bool:
        """Move a stale claim out of the way; False when the file was not the one judged
        stale (someone else took it over first and their fresh claim is put back)."""
        tomb = path.with_name(path.name + _TOMB + uuid.uuid4().hex)
        try:
            os.rename(path, tomb)
        except FileNotFoundError:
            return True  # gone already: the next turn may claim it
        moved = _read(tomb)
        tomb.unlink(missing_ok=True)
        same = (moved is None and judged is None) or (
            moved is not None and judged is not None and moved.token == judged.token
        )
        if same:
            return True
        if moved is not None:  # a live claim was moved by mistake: put it back if still free
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                try:
                    os.write(fd, json.dumps(asdict(moved)).encode())
                finally:
                    os.close(fd)
        return False


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except FileNotFoundError:
        return True


def _read(path: Path) -> Claim | None:
    try:
        data = json.loads(path.read_text())
        return Claim(int(data["pid"]), str(data["host"]), data.get("started"), float(data["time"]),
                     str(data["token"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
