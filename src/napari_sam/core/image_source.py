"""An image of any layout seen as a sequence of 2D planes, read lazily.

SAM embeds 2D planes. Microscopy images come as YX, YX with channels, ZYX or TZYX (and
OME-Zarr's TCZYX), held in memory, in dask arrays or in Zarr stores far larger than
memory. :class:`ImageSource` names the axes once, picks the channel, numbers the planes
(every combination of the T and Z indices, row-major) and reads any rectangle of any
plane without touching the rest of the array.

Axis letters: ``T`` (time), ``Z`` (depth), ``C`` (channels; RGB(A) when it has 3 or 4
entries and no channel is chosen), ``Y`` (rows), ``X`` (columns).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from .preprocess import Normalization
from .sampling import sample_regions

__all__ = ["ImageSource", "guess_axes"]

AXES = "TZCYX"
_PLANE_AXES = "TZ"
# Blocks sampled for intensity statistics: 64 blocks of 256 x 256 pixels, spread over the
# image, are enough for stable percentiles and read in well under a second. The blocks lie
# on a fixed grid, not on the storage chunks, so the same pixels give the same limits
# (and embeddings) whether they come from a TIFF, a dask array or any Zarr chunking.
_STAT_SAMPLES = 64
_STAT_BLOCK = 256


_MAX_TRAILING_CHANNELS = 8


def guess_axes(shape: tuple[int, ...]) -> str:
    """The usual reading of an unlabelled array: YX, YXC (3-4 trailing colours, or up to 8
    channels far fewer than the rows), ZYX, TZYX."""
    ndim = len(shape)
    if ndim == 2:
        return "YX"
    # Three or four trailing values are colours; a few more, far fewer than the rows, are
    # channels too: no plane is that narrow.
    last = shape[-1] if ndim >= 3 else 0
    channels = ndim >= 3 and (last in (3, 4) or (last <= _MAX_TRAILING_CHANNELS and 4 * last <= shape[-2]))
    if ndim == 3:
        return "YXC" if channels else "ZYX"
    if ndim == 4:
        return "ZYXC" if channels else "TZYX"
    if ndim == 5:
        return "TCZYX"
    raise ValueError(f"cannot guess the axes of a {ndim}-D array of shape {tuple(shape)}: name them (e.g. axes='TZYX')")


class ImageSource:
    """A 2D, 3D or 4D image as a sequence of planes.

    Parameters
    ----------
    array
        numpy, dask or zarr array (anything with ``shape``, ``dtype`` and slicing).
    axes
        One letter per axis from ``TZCYX``, e.g. ``"ZYX"``; guessed from the shape when
        omitted (see :func:`guess_axes`).
    channel
        For a ``C`` axis: the channel to segment. Omitted (or ``"rgb"``) with 3 or 4
        channels: RGB(A); with one channel: that one. ``"haematoxylin"``: that stain
        separated from RGB (:mod:`napari_sam.core.stain`); planes then read as float32.
    path
        Where the array was read from, if anywhere (the default cache goes beside it).

    Attributes
    ----------
    plane_axes : str
        The axes that index planes (``""``, ``"Z"``, ``"T"`` or ``"TZ"``).
    plane_grid : tuple of int
        Their sizes; planes are numbered row-major over this grid.
    plane_shape : tuple of int
        (height, width) of every plane.

    Examples
    --------
    >>> src = ImageSource(np.zeros((5, 64, 80), np.uint16), axes="ZYX")
    >>> src.n_planes, src.plane_shape
    (5, (64, 80))
    >>> src.read(3, region=(0, 10, 20, 40)).shape
    (10, 20)
    """

    def __init__(self, array, axes: str | None = None, channel: int | str | None = None,
                 path: str | os.PathLike | None = None):
        if isinstance(array, (str, os.PathLike)):
            raise TypeError(f"an ImageSource holds an array: open the file {os.fspath(array)!r} with "
                            "ImageSource.open(path) (or ImageSource.of)")
        if not (hasattr(array, "shape") and hasattr(array, "dtype")):
            raise TypeError(f"an image is an array (numpy, dask, zarr), not {type(array).__name__}")
        shape = tuple(int(s) for s in array.shape)
        given_axes = axes is not None
        axes = (axes or guess_axes(shape)).upper()
        if len(axes) != len(shape):
            raise ValueError(
                f"axes {axes!r} name {len(axes)} axes, but the image has shape {shape} ({len(shape)} axes)"
            )
        if len(set(axes)) != len(axes) or set(axes) - set(AXES):
            raise ValueError(f"axes {axes!r} must be distinct letters from {AXES!r}")
        if "Y" not in axes or "X" not in axes:
            raise ValueError(f"axes {axes!r} must include Y and X")
        if np.dtype(array.dtype).kind not in "uifb":
            raise ValueError(f"cannot segment an image of dtype {array.dtype}")
        self.array = array
        self.axes = axes
        self.shape = shape
        self.dtype = np.dtype(array.dtype)
        self.path = None if path is None else str(path)
        self.plane_axes = "".join(a for a in axes if a in _PLANE_AXES)
        self.plane_grid = tuple(shape[axes.index(a)] for a in self.plane_axes)
        self.plane_shape = (shape[axes.index("Y")], shape[axes.index("X")])
        if min(self.plane_shape) == 0 or 0 in self.plane_grid:
            raise ValueError(f"the image is empty: shape {shape}")
        if channel is not None and not isinstance(channel, str):
            if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)):
                raise ValueError(f"channel must be a whole number (or a name), not {channel!r}")
            channel = int(channel)  # numpy integers index as ints do
        self.rgb = False
        self.stain = None  # "haematoxylin" when planes are that stain separated from RGB
        self._white: float | None = None
        if isinstance(channel, str):
            from .stain import HAEMATOXYLIN, STAIN_CHANNELS, float_white

            n = shape[axes.index("C")] if "C" in axes else 0
            if channel not in STAIN_CHANNELS:
                raise ValueError(f"channel {channel!r} is not a channel number or one of {', '.join(STAIN_CHANNELS)}")
            if n not in (3, 4):
                raise ValueError(f"channel {channel!r} needs an RGB(A) image, but the axes {axes!r} of shape "
                                 f"{shape} have no C axis of 3 or 4 channels")
            self.rgb = True
            if channel == HAEMATOXYLIN:
                self.stain = channel
                # floats: one white for every tile, from a sample of the whole image
                self._white = float_white(self._sample(None)) if self.dtype.kind == "f" else None
                self.dtype = np.dtype(np.float32)  # what read() returns
        elif "C" in axes:
            n = shape[axes.index("C")]
            if channel is None:
                if n in (3, 4):
                    self.rgb = True
                elif n == 1:
                    channel = 0
                else:
                    raise ValueError(f"the image has {n} channels (axes {axes!r}): choose one with channel=... "
                                     "(--channel on the command line), or name the axes if these are not channels")
            elif not 0 <= channel < n:
                raise ValueError(f"channel {channel} does not exist; the image has {n} channels (0 to {n - 1})")
        elif channel is not None:
            named = "" if given_axes else ", guessed from the shape,"
            raise ValueError(f"channel {channel} given, but the axes {axes!r}{named} have no C axis: name them "
                             "(axes='CYX', --axes CYX on the command line)")
        self.channel = channel

    @classmethod
    def of(cls, image, axes: str | None = None, channel: int | str | None = None) -> "ImageSource":
        """``image`` as an ImageSource: itself if it is one, else opened from a path
        (:meth:`open`) or wrapping an array (numpy, dask, zarr) with ``axes`` and ``channel``."""
        if isinstance(image, ImageSource):
            asked = (("axes", None if axes is None else axes.upper(), image.axes), ("channel", channel, image.channel))
            differs = [f"{name}={value!r}" for name, value, own in asked if value is not None and value != own]
            if differs:  # silently dropped, they would segment another array than the one asked for
                raise ValueError(f"{', '.join(differs)} given with an ImageSource that has axes={image.axes!r}, "
                                 f"channel={image.channel!r}: make the ImageSource with them instead")
            return image
        return cls.open(image, axes, channel) if isinstance(image, (str, os.PathLike)) else cls(image, axes, channel)

    @classmethod
    def open(cls, path: str | os.PathLike, axes: str | None = None, channel: int | str | None = None) -> "ImageSource":
        """Open a TIFF, .npy, PNG/JPEG file or a Zarr array/group (v2, v3, OME-Zarr, whose
        full-resolution level is used and whose declared axes are the default)."""
        from .io import image_axes, planar_rgb, read_image

        array = read_image(path)
        axes = axes or image_axes(path)
        if axes is None and planar_rgb(path):
            warnings.warn(f"{path} declares RGB stored plane by plane; its axes are read as {guess_axes(array.shape)}"
                          " (name them, e.g. axes='CYX' or --axes CYX, to read the planes as colours)", stacklevel=2)
        return cls(array, axes, channel, path=Path(path).expanduser())

    # -- planes ----------------------------------------------------------------------------
    @property
    def n_planes(self) -> int:
        """Number of 2D planes."""
        return int(np.prod(self.plane_grid, dtype=np.int64))

    def stack_through(self, plane: int | tuple[int, ...] | None = None) -> list[tuple[int, ...]]:
        """Every plane along the innermost plane axis (Z, else T) through ``plane`` (flat
        number or tuple; None where the image has one such stack), as :meth:`plane_index`
        tuples: for a TZYX image, the Z stack at ``plane``'s t."""
        grid = self.plane_grid
        if not grid:
            raise ValueError("whole_volume needs a stack of planes; this image is a single 2D plane")
        if plane is None and int(np.prod(grid[:-1])) > 1:
            raise ValueError(f"the image has {self.plane_axes} planes: give plane= to choose the stack along "
                             f"{self.plane_axes[-1]}")
        outer = self.plane_index(0 if plane is None else plane)[:-1]
        return [outer + (i,) for i in range(grid[-1])]

    def plane_index(self, plane: int | tuple[int, ...] | None) -> tuple[int, ...]:
        """Normalise a flat plane number or a (t, z) tuple to the tuple form; None names the
        plane of an image that has one."""
        if plane is None:
            if self.n_planes != 1:
                raise IndexError(f"give the plane: the image has {self.n_planes} planes along {self.plane_axes!r}")
            plane = 0
        if isinstance(plane, (int, np.integer)):
            n = self.n_planes
            if not -n <= plane < n:
                raise IndexError(f"plane {plane} does not exist: the image has {n} plane(s)")
            return tuple(int(i) for i in np.unravel_index(int(plane) % n, self.plane_grid)) if self.plane_grid else ()
        index = tuple(int(i) for i in plane)
        if len(index) != len(self.plane_grid):
            raise IndexError(f"plane index {index} needs one entry per plane axis {self.plane_axes!r}")
        for i, n, a in zip(index, self.plane_grid, self.plane_axes):
            if not 0 <= i < n:
                raise IndexError(f"{a} index {i} outside 0..{n - 1}")
        return index

    def flat_index(self, plane: int | tuple[int, ...]) -> int:
        """The plane's number in 0..n_planes-1."""
        index = self.plane_index(plane)
        return int(np.ravel_multi_index(index, self.plane_grid)) if index else 0

    def _selection(self, plane, region) -> tuple:
        index = dict(zip(self.plane_axes, self.plane_index(plane)))
        y0, y1, x0, x1 = region if region is not None else (0, self.plane_shape[0], 0, self.plane_shape[1])
        sel: list[int | slice | None] = []
        for a in self.axes:
            if a in index:
                sel.append(index[a])
            elif a == "Y":
                sel.append(slice(y0, y1))
            elif a == "X":
                sel.append(slice(x0, x1))
            else:  # C
                sel.append(self.channel if isinstance(self.channel, int) and not self.rgb else slice(0, 3))
        return tuple(sel)

    def read(self, plane: int | tuple[int, ...] = 0, region: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Read (part of) a plane into memory.

        Parameters
        ----------
        plane
            Flat plane number or (t, z) tuple.
        region
            ``(y0, y1, x0, x1)`` in plane pixels (end exclusive); the whole plane if None.

        Returns
        -------
        numpy.ndarray
            (h, w) for one channel, (h, w, 3) for RGB.
        """
        if region is not None:
            y0, y1, x0, x1 = region
            H, W = self.plane_shape
            if not (0 <= y0 < y1 <= H and 0 <= x0 < x1 <= W):
                raise ValueError(f"region {region} (y0, y1, x0, x1) is not inside the {H}x{W} plane")
        data = np.asarray(self.array[self._selection(plane, region)])
        # The result keeps the kept axes in array order: bring them to (Y, X[, C]).
        kept = [a for a in self.axes if a in "YX" or (a == "C" and self.rgb)]
        data = np.transpose(data, [kept.index(a) for a in ("Y", "X", "C") if a in kept])
        return self._separate(data) if self.stain else data

    def _separate(self, rgb: np.ndarray) -> np.ndarray:
        from .stain import haematoxylin

        return haematoxylin(rgb, self._white)

    def with_channel(self, channel: int | str | None) -> "ImageSource":
        """The same array, axes and path read through another channel."""
        return self if channel == self.channel else ImageSource(self.array, self.axes, channel, path=self.path)

    # -- intensities -------------------------------------------------------------------------
    def intensity_limits(
        self, normalization: Normalization = Normalization(), plane: int | tuple[int, ...] | None = None
    ) -> tuple[float, float] | None:
        """Intensity limits shared by every tile: from a sample of chunks of the whole
        image (``plane=None``) or of one plane, never from the whole array.

        Returns None when values pass through unchanged (uint8 data in ``"auto"`` mode).
        """
        return normalization.resolve_limits(lambda: self._sample(plane, self.stain is not None), self.dtype)

    def _sample(self, plane, separate: bool = False) -> np.ndarray:
        """Finite values from a sample of chunks of the image (``plane`` None) or of one
        plane; with ``separate``, the stain of each sampled pixel's RGB triple."""
        def values_of(region: tuple) -> np.ndarray:
            data = np.asarray(self.array[region])
            if separate:
                data = self._separate(np.moveaxis(data, self.axes.index("C"), -1))
            return np.ravel(data)

        values = np.concatenate([values_of(r) for r in self._stat_regions(plane)])
        if values.dtype.kind == "f":
            values = values[np.isfinite(values)]
            if values.size == 0:
                raise ValueError("the sampled image holds no finite values")
        return values

    def _stat_regions(self, plane) -> list[tuple]:
        # One plane is sampled as an array whose plane axes have length 1, so that the
        # chunks it crosses are spread over it just as they are over a whole volume.
        fixed = {} if plane is None else dict(zip(self.plane_axes, self.plane_index(plane)))
        shape = tuple(1 if a in fixed else s for a, s in zip(self.axes, self.shape))
        blocks = tuple(min(_STAT_BLOCK, n) if a in "YX" else 1 for a, n in zip(self.axes, shape))
        regions = sample_regions(shape, blocks, _STAT_SAMPLES)
        return [
            self._cut(tuple(slice(fixed[a], fixed[a] + 1) if a in fixed else r for a, r in zip(self.axes, region)))
            for region in regions
        ]

    def _cut(self, region: tuple) -> tuple:
        """Limit a region to the channel(s) used."""
        if "C" not in self.axes:
            return region
        c = self.axes.index("C")
        if self.rgb:
            chosen = slice(0, 3)
        elif not isinstance(self.channel, int):  # __init__ picks a channel whenever C is not RGB
            raise ValueError(f"no channel chosen among the {self.shape[c]} of axis C")
        else:
            chosen = slice(self.channel, self.channel + 1)
        return region[:c] + (chosen,) + region[c + 1 :]

    def describe(self) -> str:
        """One line for messages: shape, axes, dtype and the channel used."""
        what = "channel %d" % self.channel if isinstance(self.channel, int) else "gray"
        what = self.stain or ("RGB" if self.rgb else what)
        return f"{'x'.join(map(str, self.shape))} {self.axes} {self.dtype} ({what}, {self.n_planes} plane(s))"
