"""``napari-sam models`` and ``napari-sam download``: the checkpoint registry."""

from __future__ import annotations

__all__ = ["download", "models"]


def models(args) -> int:
    from ..core.models import DEFAULT_CHECKPOINT, DEFAULT_MODEL
    from ..weights import list_models

    if DEFAULT_CHECKPOINT.is_file():
        print(f"{DEFAULT_MODEL:24s} the small model shipped with the package (no download; the default when "
              f"--model is not given)")
    for entry in list_models():
        print(f"{entry.name:24s} {entry.description}")
    return 0


def download(args) -> int:
    from ..core.models import DEFAULT_CHECKPOINT, DEFAULT_MODEL
    from ..weights import fetch_checkpoint, fetch_decoder

    if args.name == DEFAULT_MODEL:
        print(DEFAULT_CHECKPOINT)  # shipped inside the package: nothing to fetch
        return 0
    print(fetch_checkpoint(args.name))
    decoder = fetch_decoder(args.name)  # micro-sam's instance decoder, a file of its own
    if decoder is not None:
        print(decoder)
    return 0
