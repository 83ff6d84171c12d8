"""The ``napari-sam`` command line.

    napari-sam models
    napari-sam segment IMAGE --model NAME_OR_CHECKPOINT --point X Y [--box X0 Y0 X1 Y1] --out labels.tif
    napari-sam embed IMAGE --model NAME_OR_CHECKPOINT --out CACHE.zarr [--axes ZYX] [--scheduler local:2]
    napari-sam info CACHE.zarr

Coordinates are pixels of the image as (x, y), that is (column, row).
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from . import cache, learning, registry, segment, viewer
    from .parser import build_parser

    args = build_parser().parse_args(argv)
    handlers = {
        "segment": segment.segment,
        "propagate": segment.propagate,
        "embed": cache.embed,
        "info": cache.info,
        "train": learning.train,
        "evaluate": learning.evaluate,
        "annotate": viewer.annotate,
        "models": registry.models,
        "download": registry.download,
    }
    try:
        return handlers[args.command](args)
    except (ValueError, FileExistsError, KeyError, RuntimeError) as err:
        print(f"napari-sam {args.command}: error: {err}", file=sys.stderr)
        return 2
