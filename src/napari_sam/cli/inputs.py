"""What the command line checks before it loads a model: planes, channels, tiling.

Every check raises :class:`~napari_sam.cli.UsageError` (a ValueError) with one line that
names the option and the valid values, so a mistake costs seconds, not a model load.
"""

from __future__ import annotations

import numpy as np

from . import UsageError

__all__ = ["check_planes", "check_tiling", "select_plane"]


def select_plane(image, plane: list[int], channel: int | str | None, path) -> np.ndarray:
    """The 2D plane (channels last) that ``--plane`` and ``--channel`` choose in ``image``.

    Raises
    ------
    UsageError
        For a wrong number of plane indices, an index or channel out of range, or a channel
        asked of an image without one; the message gives the valid range.
    """
    shape = tuple(int(s) for s in image.shape)
    has_channel = channel is not None
    if has_channel and len(shape) < 3:
        raise UsageError(f"--channel {channel} given, but {path} has shape {shape}: no channel axis (channels last)")
    spatial = 3 if has_channel or (len(shape) >= 3 and shape[-1] in (3, 4) and len(plane) == len(shape) - 3) else 2
    leading = shape[: len(shape) - spatial]
    ranges = ", ".join(f"0 to {n - 1}" for n in leading)
    if len(plane) != len(leading):
        need = f"--plane with {len(leading)} index(es) ({ranges})" if leading else "no --plane"
        extra = "" if has_channel or len(shape) < 3 else "; for a multichannel image also --channel"
        raise UsageError(f"{path} has shape {shape}: it needs {need}, got {len(plane)}{extra}")
    for axis, (i, n) in enumerate(zip(plane, leading)):
        if not 0 <= i < n:
            raise UsageError(f"--plane {i} does not exist: axis {axis} of {path} (shape {shape}) has {n} plane(s), "
                             f"0 to {n - 1}")
    if isinstance(channel, str) and shape[-1] not in (3, 4):
        raise UsageError(f"--channel {channel} is read from RGB: {path} has shape {shape}, not 3 or 4 channels last")
    if has_channel and not isinstance(channel, str) and not 0 <= channel < shape[-1]:
        raise UsageError(f"--channel {channel} does not exist: {path} has {shape[-1]} channel(s), "
                         f"0 to {shape[-1] - 1} (channels last)")
    return np.asarray(image[tuple(plane)] if plane else image[...])


def check_planes(planes: list[int] | None, n_planes: int, option: str = "--planes") -> None:
    """Refuse flat plane numbers outside ``0 .. n_planes - 1``, naming them."""
    bad = [p for p in planes or [] if not 0 <= p < n_planes]
    if bad:
        raise UsageError(f"{option} {' '.join(map(str, bad))}: the image has {n_planes} plane(s), "
                         f"numbered 0 to {n_planes - 1}")


def check_tiling(tile: int | None, halo: int | None, default_tile: int | None = None,
                 default_halo: int | None = None) -> None:
    """Refuse tile and halo values that cannot tile or that waste most of the work.

    A halo wider than the tile means each embedded window is mostly context: the work per
    useful pixel grows with ((tile + 2 halo) / tile)^2, 9x already at halo == tile. The
    defaults, where given, stand in for an option left out (and the message says so).
    """
    if tile is not None and tile <= 0:
        raise UsageError(f"--tile {tile}: the tile side must be a positive number of pixels")
    if halo is not None and halo < 0:
        raise UsageError(f"--halo {halo}: the halo cannot be negative")
    t, h = tile if tile is not None else default_tile, halo if halo is not None else default_halo
    if t is None or h is None or h <= t:
        return
    waste = f"each tile would embed more halo than interior ({(t + 2 * h) ** 2 // t ** 2}x the pixels it keeps)"
    if halo is None:
        raise UsageError(f"--tile {t} is smaller than the default halo {h}: {waste}; give --halo of at most {t}")
    named = f"--tile {t}" if tile is not None else f"the default tile {t}"
    raise UsageError(f"--halo {h} is larger than {named}: {waste}; use a halo of at most the tile")
