"""Progress of a running evaluation: each ``iter_evaluate_*`` generator yields one
:class:`EvalProgress` per image (the viewer's progress bar) and returns its results;
:func:`run_to_end` is the plain call that only wants the results."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["EvalProgress", "run_to_end"]

T = TypeVar("T")


@dataclass(frozen=True)
class EvalProgress:
    """Progress of an evaluation: ``done`` of ``total`` images, the last one ``name``."""

    done: int
    total: int
    name: str


def run_to_end(gen: Generator[EvalProgress, None, T]) -> T:
    """Drive an ``iter_evaluate_*`` generator to its end; returns its results."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
