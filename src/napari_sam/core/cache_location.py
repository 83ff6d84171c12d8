"""Where an embedding cache lives when the caller does not say: beside a Zarr image, or
in the user cache under the image's fingerprint."""

from __future__ import annotations

import os
from pathlib import Path

from .image_source import ImageSource
from .io import zarr_image_folder

__all__ = ["cache_path_for", "default_cache_path"]


def default_cache_path(source: ImageSource, fingerprint_: str) -> Path:
    """Beside a Zarr input when its folder is writable (``image.zarr`` ->
    ``image.sam-embeddings.zarr``; beside the outermost store for an array inside one;
    also for a Zarr array opened in a script, as for its path), else in the user cache
    folder under the image's fingerprint."""
    path = Path(source.path) if source.path is not None else zarr_image_folder(source.array)
    if path is not None:
        if path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zarray").exists():
            # an array inside a Zarr hierarchy (an OME-Zarr level, grp.zarr/raw): beside the
            # hierarchy, never inside the user's store; its arrays share one cache folder
            while _is_zarr_node(path.parent):
                path = path.parent
            if os.access(path.parent, os.W_OK):
                return path.with_name(path.name.removesuffix(".zarr") + ".sam-embeddings.zarr")
    from ..weights import cache_dir

    return cache_dir() / "embeddings" / (fingerprint_.split(":")[-1][:24] + ".zarr")


def _is_zarr_node(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray"))


def cache_path_for(cache, source: ImageSource, fingerprint_: str) -> Path | None:
    """Where a cache argument points: None (or True) for :func:`default_cache_path`, False
    for none (memory only), else the given folder."""
    if cache is False:
        return None
    if cache is None or cache is True:
        return default_cache_path(source, fingerprint_)
    return Path(cache).expanduser()
