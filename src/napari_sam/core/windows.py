"""Object-centred windows for propagation with SAM 2's memory on planes larger than its input.

SAM 2 sees an S x S input (1024 pixels for the released models). A plane no larger than
that along an axis is taken whole along it; a larger plane is propagated on a window of
S native pixels (no shrinking) around the object. The windows lie on a lattice: their
origins are multiples of ``step`` (S/4 by default), the last one shifted back so that every
window lies inside the plane. Each window is one entry of the feature cache, so a window
once embedded serves every object and every later run that uses it.

A window is equally a tile of :mod:`~napari_sam.core.tiling`'s kind: an interior of
``step`` pixels (the cell of the lattice) grown by a halo of ``(S - step) / 2`` on each
side; the feature cache records ``tile=step, halo=(S - step) / 2`` in its signature. Unlike
a tile, a window at the plane's border is shifted inward, never clipped, so that every
window shows S native pixels.

Objects choose windows as follows (:meth:`WindowGrid.cover`): each object may go to any
window that holds its box with ``margin`` pixels to spare on every side that is not the
plane's border; windows are taken greedily, the one that holds the most objects first, so
that neighbours share a window (and one memory bank). An object whose box nears the edge of
its window as it moves through the stack (:meth:`WindowGrid.near_edge`) is moved to the
window centred on it (:meth:`WindowGrid.around`), where a new memory bank starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["Window", "WindowGrid"]


@dataclass(frozen=True)
class Window:
    """One window of a :class:`WindowGrid`.

    Attributes
    ----------
    index
        (row, column) of the window on the lattice; (0, 0) is the whole plane when the plane
        fits the model input.
    region
        ``(y0, y1, x0, x1)`` in plane pixels (end exclusive).
    """

    index: tuple[int, int]
    region: tuple[int, int, int, int]

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in plane pixels."""
        y0, y1, x0, x1 = self.region
        return y1 - y0, x1 - x0

    @property
    def slices(self) -> tuple[slice, slice]:
        """``plane[window.slices]`` is the window's crop."""
        y0, y1, x0, x1 = self.region
        return slice(y0, y1), slice(x0, x1)


@dataclass(frozen=True)
class WindowGrid:
    """The windows SAM 2 may propagate on in an (H, W) plane.

    Parameters
    ----------
    shape
        (H, W) of the plane.
    side
        Window side in plane pixels along an axis longer than it (the model input, S).
    step
        Spacing of the window origins; ``side - step`` must be even (the halo).
    margin
        Pixels an object's box keeps from a window edge (inside the plane) before the
        window follows it.

    Examples
    --------
    >>> grid = WindowGrid((3000, 800), side=1024, step=256)
    >>> grid.grid_shape, grid[1, 0].region
    ((9, 1), (256, 1280, 0, 800))
    >>> grid.around((2900, 2950, 100, 150)).region
    (1976, 3000, 0, 800)
    """

    shape: tuple[int, int]
    side: int
    step: int
    margin: int = 0

    def __post_init__(self):
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ValueError(f"a window grid needs a 2D plane shape with positive sides, got {self.shape}")
        if not 0 < self.step <= self.side or (self.side - self.step) % 2:
            raise ValueError(f"window step {self.step} must lie in 1..{self.side} and differ from the window side "
                             f"{self.side} by an even number of pixels")
        if not 0 <= 2 * self.margin < self.side:
            raise ValueError(f"window margin {self.margin} must lie in 0..{(self.side - 1) // 2}")

    @property
    def halo(self) -> int:
        """Pixels each window adds on each side of its lattice cell (``(side - step) / 2``)."""
        return (self.side - self.step) // 2

    @cached_property
    def _origins(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        def origins(n: int) -> tuple[int, ...]:
            if n <= self.side:
                return (0,)
            count = math.ceil((n - self.side) / self.step) + 1
            return tuple(min(i * self.step, n - self.side) for i in range(count))

        return origins(self.shape[0]), origins(self.shape[1])

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, columns) of windows."""
        oy, ox = self._origins
        return len(oy), len(ox)

    def __len__(self) -> int:
        rows, cols = self.grid_shape
        return rows * cols

    def __getitem__(self, index: tuple[int, int]) -> Window:
        r, c = (int(i) for i in index)
        rows, cols = self.grid_shape
        if not (0 <= r < rows and 0 <= c < cols):
            raise IndexError(f"window {index} outside a {rows}x{cols} grid")
        (oy, ox), (H, W) = self._origins, self.shape
        y0, x0 = oy[r], ox[c]
        return Window((r, c), (y0, min(H, y0 + self.side), x0, min(W, x0 + self.side)))

    def __iter__(self):
        rows, cols = self.grid_shape
        for r in range(rows):
            for c in range(cols):
                yield self[r, c]

    def around(self, region: tuple[int, int, int, int]) -> Window:
        """The window whose centre lies nearest the centre of ``region`` (y0, y1, x0, x1)."""
        index = []
        for origins, (b0, b1), n in zip(self._origins, (region[:2], region[2:]), self.shape):
            extent = min(n, self.side)
            centre = (b0 + b1) / 2
            index.append(int(np.argmin([abs(o + extent / 2 - centre) for o in origins])))
        return self[index[0], index[1]]

    def near_edge(self, window: Window, region: tuple[int, int, int, int]) -> bool:
        """Whether ``region`` (y0, y1, x0, x1) comes within :attr:`margin` of an edge of
        ``window`` that lies inside the plane (or crosses it): time to follow the object."""
        y0, y1, x0, x1 = window.region
        H, W = self.shape
        b0, b1, c0, c1 = region
        m = self.margin
        return bool((y0 > 0 and b0 < y0 + m) or (y1 < H and b1 > y1 - m)
                    or (x0 > 0 and c0 < x0 + m) or (x1 < W and c1 > x1 - m))

    def holds(self, window: Window, region: tuple[int, int, int, int]) -> bool:
        """Whether ``region`` lies inside ``window`` away from its inner edges."""
        y0, y1, x0, x1 = window.region
        inside = y0 <= region[0] and region[1] <= y1 and x0 <= region[2] and region[3] <= x1
        return inside and not self.near_edge(window, region)

    def cover(self, regions: list[tuple[int, int, int, int]]) -> list[tuple[Window, list[int]]]:
        """Windows for objects, greedily shared.

        Parameters
        ----------
        regions
            Each object's (y0, y1, x0, x1) in plane pixels.

        Returns
        -------
        list of (Window, list of int)
            Each window used and the positions in ``regions`` of the objects it takes; every
            object is in exactly one. An object that no window holds (larger than a window
            allows) gets the window :meth:`around` it.
        """
        windows = list(self)
        holds = np.array([[self.holds(w, r) for w in windows] for r in regions], bool).reshape(
            len(regions), len(windows))
        left = list(range(len(regions)))
        out: list[tuple[Window, list[int]]] = []
        while left:
            counts = holds[left].sum(axis=0)
            if counts.max() == 0:  # the rest fits no window: each gets the one around it
                by_window: dict[tuple[int, int], list[int]] = {}
                for i in left:
                    by_window.setdefault(self.around(regions[i]).index, []).append(i)
                out += [(self[index], taken) for index, taken in sorted(by_window.items())]
                break
            # of the fullest windows, the one whose objects lie nearest its centre
            best = min(np.flatnonzero(counts == counts.max()),
                       key=lambda w: sum(_offset(windows[w], regions[i]) for i in left if holds[i, w]))
            taken = [i for i in left if holds[i, best]]
            out.append((windows[best], taken))
            left = [i for i in left if not holds[i, best]]
        return out


def _offset(window: Window, region: tuple[int, int, int, int]) -> float:
    """Distance in pixels between the centres of a window and a region."""
    y0, y1, x0, x1 = window.region
    return math.hypot((region[0] + region[1] - y0 - y1) / 2, (region[2] + region[3] - x0 - x1) / 2)
