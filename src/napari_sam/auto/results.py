"""What the automatic modes report while they work and what they return.

Long work is written as generators that yield :class:`Progress` and *return* their
:class:`AutomaticResult` (``StopIteration.value``), so that a viewer can show progress
and cancel between units; :func:`run` drives one to the end.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np

__all__ = ["AutomaticResult", "Progress", "run"]


@dataclass(frozen=True)
class Progress:
    """Progress of a long computation.

    Attributes
    ----------
    done, total
        Units finished (tiles, batches of boxes, or planes), out of ``total``.
    plane
        Flat plane number being worked on.
    tile
        (row, col) of the tile just finished, or None.
    stage
        What the units are: ``"tiles"``, ``"boxes"``, ``"prompts"`` or ``"planes"``.
    """

    done: int
    total: int
    plane: int
    tile: tuple[int, int] | None = None
    stage: str = "tiles"


@dataclass
class AutomaticResult:
    """Objects found on a plane.

    Object ``i + 1`` of :attr:`labels` is described by entry ``i`` of every array.

    Attributes
    ----------
    labels
        (H, W) uint32 instance labels, 0 = background, ids 1..n with no gaps, numbered
        from the largest object to the smallest.
    iou
        (n,) predicted IoU of each object's mask.
    stability
        (n,) stability score (NaN where it was not computed).
    area
        (n,) pixels of each object in :attr:`labels`.
    """

    labels: np.ndarray
    iou: np.ndarray
    stability: np.ndarray
    area: np.ndarray

    @property
    def n_objects(self) -> int:
        return len(self.iou)

    def scores(self) -> list[dict]:
        """One JSON-able dict per object: ``{"id", "iou", "stability", "area"}``."""
        return [
            {
                "id": i + 1,
                "iou": float(self.iou[i]),
                "stability": None if np.isnan(self.stability[i]) else float(self.stability[i]),
                "area": int(self.area[i]),
            }
            for i in range(self.n_objects)
        ]


def run(generator: Generator, progress: Callable[[Progress], object] | None = None):
    """Drive one of the ``iter_*`` generators to its end and return its result;
    ``progress`` (if given) is called with each report on the way."""
    while True:
        try:
            report = next(generator)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(report)
