"""What the command line checks before it loads a model: planes, channels, tiling.

Every check raises :class:`~napari_sam.cli.UsageError` (a ValueError) with one line that
names the option and the valid values, so a mistake costs seconds, not a model load.
"""

from __future__ import annotations

from . import UsageError

__all__ = ["check_planes", "check_tiling", "source_plane", "training_data"]


def source_plane(source, plane: list[int], path) -> tuple[int, ...]:
    """The plane (indices over the image's T and Z axes) that ``--plane`` names.

    Raises
    ------
    UsageError
        For a wrong number of plane indices or an index out of range; the message gives
        the image's plane axes and the valid range.
    """
    grid, axes = source.plane_grid, source.plane_axes
    ranges = ", ".join(f"{a} 0 to {n - 1}" for a, n in zip(axes, grid))
    if len(plane) != len(grid):
        need = f"--plane with {len(grid)} index(es) ({ranges})" if grid else "no --plane"
        raise UsageError(f"{path} has axes {source.axes} of shape {source.shape}: it needs {need}, got {len(plane)}"
                         + ("" if "C" in source.axes else "; name the axes with --axes if they are read wrong"))
    for a, i, n in zip(axes, plane, grid):
        if not 0 <= i < n:
            raise UsageError(f"--plane {i} does not exist: the {a} axis of {path} has {n} plane(s), 0 to {n - 1}")
    return tuple(int(i) for i in plane)


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


def training_data(args):
    """The training pairs of ``napari-sam train``: DATA, a folder of images/ and labels/
    (``--pattern``), or one image with ``--labels``, read through ``--channel``.

    Returns
    -------
    (SegmentationDataset, dict)
        The pairs, and the ``channel_axis``/``channel`` keywords that read more pairs
        the same way (a ``--validation`` folder).

    Raises
    ------
    UsageError
        For one image without ``--labels``, and a named channel (``rgb``,
        ``haematoxylin``) on images that are not RGB: checked on the first plane, before
        any model loads.
    """
    from pathlib import Path

    from ..core.io import read_image
    from ..train import SegmentationDataset

    channels = {} if args.channel is None else {"channel_axis": -1, "channel": args.channel}
    if args.labels:
        image, labels = read_image(args.data), read_image(args.labels)
        if labels.ndim == 3:
            data = SegmentationDataset.from_stack(image, labels, name=Path(args.data).name, channel=args.channel)
        else:
            data = SegmentationDataset.from_arrays([image], [labels], names=[Path(args.data).name], **channels)
    elif Path(args.data).expanduser().is_file():
        raise UsageError(f"{args.data} is one image: give its labels with --labels (or a folder of images/ and "
                         "labels/ as DATA)")
    else:
        data = SegmentationDataset.from_folder(args.data, pattern=args.pattern, **channels)
    if isinstance(args.channel, str):
        from ..core.stain import is_rgb

        first = data[0]
        if not is_rgb(first.image, -1):
            raise UsageError(f"--channel {args.channel} reads RGB images; {first.name} has shape {first.image.shape}")
    return data, channels
