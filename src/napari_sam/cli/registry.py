"""``napari-sam models`` and ``napari-sam download``: the checkpoint registry."""

from __future__ import annotations

__all__ = ["download", "models"]


def models(args) -> int:
    from ..weights import list_models

    for entry in list_models():
        print(f"{entry.name:24s} {entry.description}")
    return 0


def download(args) -> int:
    from ..weights import fetch_checkpoint

    print(fetch_checkpoint(args.name))
    return 0
