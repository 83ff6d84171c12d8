"""The missing tiles of a cache shared among writers through their claims
(:mod:`napari_sam.core.claims`): each writer computes the tiles it claims, then waits for
those another live writer claimed, and takes over the claims of writers that are gone.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator
from itertools import chain

from .claims import Entry, TileClaims

__all__ = ["SAY_WAITING_AFTER", "claim_each", "share_work", "wait_for"]

SAY_WAITING_AFTER = 30.0
"""Seconds of waiting on another writer's tiles after which a writer says who holds them."""


def claim_each(todo: Iterable[Entry], claims: TileClaims, present: Callable[[Entry], bool],
               waiting: list[Entry]) -> Iterator[Entry]:
    """The entries of ``todo`` that this writer claims and must compute, lazily (one claim
    per entry asked for, so that a slow consumer does not hoard claims). Entries claimed
    by a live other writer, or stored by one meanwhile, go to ``waiting`` for
    :func:`wait_for`. The caller releases each entry it is given."""
    for entry in todo:
        if not claims.acquire(entry):
            waiting.append(entry)
        elif present(entry):  # another writer stored it after this one listed what was missing
            claims.release(entry)
            waiting.append(entry)
        else:
            yield entry


def wait_for(waiting: list[Entry], claims: TileClaims,
             present: Callable[[Entry], bool],
             poll: float = 0.1) -> Iterator[tuple[Entry, bool]]:
    """Wait for entries claimed by other writers: yields ``(entry, False)`` when one is
    stored, ``(entry, True)`` when its claim went stale (or was given up) and this writer
    now holds it: the caller computes and releases it."""
    pending = list(waiting)
    waited, said = 0.0, False  # time asleep here: the caller's work on tiles taken over is not waiting
    while pending:
        if not said and waited > SAY_WAITING_AFTER:
            said = True
            holder = claims.holder(pending[0])
            who = f"process {holder.pid} on {holder.host}" if holder is not None else "another writer"
            warnings.warn(f"waiting for {len(pending)} tile(s) of this cache that {who} is computing; a claim of a "
                          f"writer on another host that stopped counts as abandoned {claims.timeout / 60:g} minutes "
                          "after it was made", stacklevel=2)
        left = []
        for entry in pending:
            if present(entry):
                yield entry, False
            elif claims.acquire(entry):
                if present(entry):
                    claims.release(entry)
                    yield entry, False
                else:
                    yield entry, True
            else:
                left.append(entry)
        pending = left
        if pending:
            time.sleep(poll)
            waited += poll


def share_work(todo: list[Entry], claims: TileClaims | None,
               present: Callable[[Entry], bool],
               run: Callable[[Iterable[Entry]], Iterator[Entry]] | None = None,
               ) -> Generator[tuple[Entry, bool], None, None]:
    """The missing entries ``todo`` as this writer's share of the work.

    Yields ``(entry, compute)``: the caller computes and stores the entry when ``compute``
    is true, and its claim is released when the caller asks for the next one (at once for
    an entry stored already). ``run``, when given, computes a lazy stream of claimed entries itself (on a
    cluster) and yields each one stored; entries claimed by live other writers come last,
    as each is stored, or to be computed here when its writer died. Without ``claims`` (a
    cache in memory) every entry is this writer's. Closing the generator releases every
    claim still held.
    """
    if claims is None:
        yield from ((e, run is None) for e in (todo if run is None else run(todo)))
        return
    waiting: list[Entry] = []
    mine = claim_each(todo, claims, present, waiting)
    stream = mine if run is None else run(mine)
    try:
        for entry, compute in chain(((e, run is None) for e in stream), wait_for(waiting, claims, present)):
            if not compute:
                claims.release(entry)  # stored already
            yield entry, compute
            claims.release(entry)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # a cluster's queued tiles are cancelled before their claims go
        claims.release_all()
        claims.sweep()
