"""Splitting a large plane into overlapping tiles.

Each tile owns an *interior*: the interiors partition the plane exactly, with no gaps
and no overlaps. What the encoder sees is the interior grown by a *halo* on every side
(clipped at the plane's border), so that objects near an interior's edge are seen with
context. A prompt is answered by the tile whose interior holds it; masks are placed back
in plane coordinates through :attr:`Tile.outer`.

The split between a tile's full extent and its owned region follows zarr-python's
chunk grids, where a chunk's buffer and its valid region are kept apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

__all__ = ["DEFAULT_HALO", "DEFAULT_TILE", "Tile", "TileGrid", "default_tiling"]

DEFAULT_TILE = 768
"""Side of a tile's interior for SAM's 1024-pixel input (three quarters of the input in
general). With the default halo a tile's embedded region is exactly the model's input
size, so large planes are embedded at their own resolution, never shrunk (see
docs/embeddings.md for the measurement)."""
DEFAULT_HALO = 128
"""Context on each side of a tile's interior for a 1024-pixel input (an eighth of it)."""


def default_tiling(image_size: int, magnification: float = 1.0) -> tuple[int, int]:
    """(tile, halo) whose embedded region, ``image_size / magnification`` plane pixels
    (rounded to a multiple of 8), fills the model input of ``image_size`` exactly: the
    model sees the plane enlarged ``magnification`` times (see
    :mod:`napari_sam.core.scale`)."""
    side = max(16, 8 * round(image_size / magnification / 8))
    halo = side // 8
    return side - 2 * halo, halo


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TileGrid`.

    Attributes
    ----------
    index
        (row, column) of the tile in the grid.
    inner
        ``(y0, y1, x0, x1)``: the interior this tile owns, in plane pixels (end exclusive).
    outer
        ``(y0, y1, x0, x1)``: the interior plus the halo, clipped to the plane; the region
        that is embedded.
    """

    index: tuple[int, int]
    inner: tuple[int, int, int, int]
    outer: tuple[int, int, int, int]

    @property
    def outer_slices(self) -> tuple[slice, slice]:
        """Slices that cut the embedded region out of the plane: ``plane[tile.outer_slices]``."""
        y0, y1, x0, x1 = self.outer
        return slice(y0, y1), slice(x0, x1)

    @property
    def inner_in_outer(self) -> tuple[slice, slice]:
        """The interior in the coordinates of the embedded region."""
        y0, y1, x0, x1 = self.inner
        oy, _, ox, _ = self.outer
        return slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the embedded region."""
        y0, y1, x0, x1 = self.outer
        return y1 - y0, x1 - x0

    def to_local(self, x: float, y: float) -> tuple[float, float]:
        """Plane (x, y) to coordinates inside the embedded region."""
        return x - self.outer[2], y - self.outer[0]


@dataclass(frozen=True)
class TileGrid:
    """Overlapping tiles covering a (height, width) plane.

    Parameters
    ----------
    shape
        (height, width) of the plane in pixels.
    tile
        Side of a tile's interior. A plane no larger than ``tile + 2 * halo`` in both
        directions is one tile: there is nothing to gain from splitting it.
    halo
        Context added on every side of an interior.

    Examples
    --------
    >>> grid = TileGrid((5000, 3000), tile=1024, halo=128)
    >>> grid.grid_shape
    (5, 3)
    >>> grid.tile_at(x=1100, y=20).index
    (0, 1)
    """

    shape: tuple[int, int]
    tile: int = DEFAULT_TILE
    halo: int = DEFAULT_HALO

    def __post_init__(self):
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ValueError(f"a tile grid needs a 2D plane shape with positive sides, got {self.shape}")
        if self.tile <= 0 or self.halo < 0:
            raise ValueError(f"tile must be positive and halo non-negative, got tile={self.tile}, halo={self.halo}")

    @cached_property
    def _edges(self) -> tuple[list[int], list[int]]:
        def edges(n: int) -> list[int]:
            if n <= self.tile + 2 * self.halo:
                return [0, n]
            count = math.ceil(n / self.tile)
            # even interiors, so that no tile is a sliver
            return [round(i * n / count) for i in range(count + 1)]

        return edges(self.shape[0]), edges(self.shape[1])

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, columns) of tiles."""
        ey, ex = self._edges
        return len(ey) - 1, len(ex) - 1

    def __len__(self) -> int:
        rows, cols = self.grid_shape
        return rows * cols

    def __getitem__(self, index: tuple[int, int]) -> Tile:
        r, c = index
        rows, cols = self.grid_shape
        if not (0 <= r < rows and 0 <= c < cols):
            raise IndexError(f"tile {index} outside a {rows}x{cols} grid")
        ey, ex = self._edges
        H, W = self.shape
        inner = (ey[r], ey[r + 1], ex[c], ex[c + 1])
        outer = (
            max(0, inner[0] - self.halo),
            min(H, inner[1] + self.halo),
            max(0, inner[2] - self.halo),
            min(W, inner[3] + self.halo),
        )
        return Tile((r, c), inner, outer)

    def __iter__(self):
        rows, cols = self.grid_shape
        for r in range(rows):
            for c in range(cols):
                yield self[r, c]

    def tile_at(self, x: float, y: float) -> Tile:
        """The tile whose interior holds the plane point (x, y)."""
        H, W = self.shape
        if not (0 <= x < W and 0 <= y < H):
            raise ValueError(f"point ({x:g}, {y:g}) lies outside the {H}x{W} plane")
        ey, ex = self._edges
        r = max(i for i in range(len(ey) - 1) if ey[i] <= y)
        c = max(i for i in range(len(ex) - 1) if ex[i] <= x)
        return self[r, c]

    def tiles_touching(self, box: tuple[float, float, float, float]) -> list[Tile]:
        """Tiles whose interiors overlap the box (x0, y0, x1, y1), in grid order."""
        x0, y0, x1, y1 = box
        return [t for t in self if t.inner[2] < x1 and x0 < t.inner[3] and t.inner[0] < y1 and y0 < t.inner[1]]
