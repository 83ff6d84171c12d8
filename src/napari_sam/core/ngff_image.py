"""An OME-Zarr image as its metadata describes it: NGFF version, axes, levels and their
coordinate transformations.

Read with ome-zarr-py (``ome_zarr.writer.get_metadata`` finds the NGFF attributes under
``ome`` in 0.5 and at the top in 0.4); used to mirror an image's pyramid in its label
images (:mod:`~napari_sam.core.ngff`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["OmeZarrImage", "VERSIONS", "axis_letters", "group_metadata", "is_ome_zarr", "level_transforms",
           "ngff_version", "read_ome_zarr"]

VERSIONS = ("0.4", "0.5")
"""The NGFF versions label images are written in (each in its image's version)."""


def group_metadata(path: Path) -> tuple[Any, dict]:
    """The Zarr group at ``path`` and its NGFF attributes, or a ValueError saying why not."""
    import zarr
    from ome_zarr.writer import get_metadata

    if not path.is_dir():
        raise ValueError(f"{path} is not an OME-Zarr image: {'no such folder' if not path.exists() else 'a file'}")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as err:  # noqa: BLE001 - an array, a plain folder, damaged metadata: all say "not a group"
        raise ValueError(f"{path} is not an OME-Zarr image: no Zarr group there") from err
    meta = get_metadata(group)
    if not meta.get("multiscales"):
        raise ValueError(f"{path} is not an OME-Zarr image: the Zarr group has no multiscales metadata")
    return group, meta


def is_ome_zarr(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an OME-Zarr image: a Zarr group with NGFF multiscales metadata
    that is not itself a label image (one that label images can go into)."""
    try:
        _, meta = group_metadata(Path(path).expanduser())
    except ValueError:
        return False
    return "image-label" not in meta


def ngff_version(path: str | os.PathLike) -> str:
    """The NGFF version of the OME-Zarr image at ``path``: ``"0.4"`` (Zarr v2) or ``"0.5"`` (Zarr v3).

    Raises
    ------
    ValueError
        Not an OME-Zarr image, or a version other than 0.4 and 0.5.
    """
    path = Path(path).expanduser()
    return _version(path, *group_metadata(path))


def _version(path: Path, group, meta: dict) -> str:
    # 0.5 puts the version beside the metadata (under "ome"); 0.4 inside each multiscale
    version = meta.get("version") if group.metadata.zarr_format == 3 else meta["multiscales"][0].get("version")
    if str(version) not in VERSIONS:
        raise ValueError(f"{path} is OME-Zarr {version}: napari-sam writes labels into NGFF 0.4 and 0.5 images only")
    return str(version)


def _compose(entries: list | None, scale: list[float], translation: list[float], where: str) -> None:
    """Apply NGFF scale/translation transforms, in order, to ``scale`` and ``translation`` in place."""
    for t in entries or []:
        kind = t.get("type")
        if kind in ("scale", "translation") and kind not in t:
            raise ValueError(f"{where}: a {kind} given by 'path' is not supported; give the values inline")
        if kind == "scale":
            for i, k in enumerate(t["scale"]):
                scale[i] *= float(k)
                translation[i] *= float(k)
        elif kind == "translation":
            for i, d in enumerate(t["translation"]):
                translation[i] += float(d)
        elif kind != "identity":
            raise ValueError(f"{where}: coordinate transformation {kind!r} is not supported")


def level_transforms(multiscale: dict, ndim: int, where: str) -> tuple[list[tuple[float, ...]],
                                                                       list[tuple[float, ...]]]:
    """Each level's scale and translation, its own transforms composed with the multiscale's."""
    scales, translations = [], []
    for ds in multiscale["datasets"]:
        scale, translation = [1.0] * ndim, [0.0] * ndim
        _compose(ds.get("coordinateTransformations"), scale, translation, where)
        _compose(multiscale.get("coordinateTransformations"), scale, translation, where)
        scales.append(tuple(scale))
        translations.append(tuple(translation))
    return scales, translations


def axis_letters(axes: list) -> str:
    """NGFF axes (dicts or names) as letters, e.g. ``"CZYX"``."""
    return "".join(str(a["name"] if isinstance(a, dict) else a)[0].upper() for a in axes)


@dataclass(frozen=True)
class OmeZarrImage:
    """An OME-Zarr image as read: what a label image must mirror.

    Attributes
    ----------
    path
        The image's folder.
    fmt
        Its ``ome_zarr.format.Format`` (FormatV04 or FormatV05).
    axes
        Its NGFF axes, as dicts (name, type, unit).
    channel
        The position of the C axis, or None.
    paths, shapes
        Each level's path in the group and shape, level 0 first.
    scales, translations
        Each level's scale and translation per axis (level and multiscale transforms composed).
    """

    path: Path
    fmt: Any  # ome_zarr.format.Format
    axes: list[dict]
    channel: int | None  # position of the C axis
    paths: list[str]
    shapes: list[tuple[int, ...]]
    scales: list[tuple[float, ...]]
    translations: list[tuple[float, ...]]

    def drop_channel(self, values: Sequence) -> tuple:
        return tuple(v for i, v in enumerate(values) if i != self.channel)

    @property
    def label_shape(self) -> tuple[int, ...]:
        return self.drop_channel(self.shapes[0])

    @property
    def label_axes(self) -> str:
        return axis_letters(list(self.drop_channel(self.axes)))


def read_ome_zarr(path: str | os.PathLike) -> OmeZarrImage:
    """The OME-Zarr image at ``path`` (NGFF 0.4 or 0.5), as its metadata describes it.

    Raises
    ------
    ValueError
        Not an OME-Zarr image, another NGFF version, a label image instead of an image,
        levels missing or not matching the axes, or transforms napari-sam does not read.
    """
    from ome_zarr.format import format_from_version

    path = Path(path).expanduser()
    group, meta = group_metadata(path)
    version = _version(path, group, meta)
    if "image-label" in meta:
        raise ValueError(f"{path} is a label image, not an image: give the OME-Zarr image it belongs to")
    multiscale = meta["multiscales"][0]
    axes = [dict(a) if isinstance(a, dict) else {"name": str(a)} for a in multiscale.get("axes", [])]
    paths = [str(ds["path"]) for ds in multiscale["datasets"]]
    try:
        shapes = [tuple(int(n) for n in group[p].shape) for p in paths]
    except KeyError as err:
        raise ValueError(f"{path}: the multiscales name a level {err} that is not there") from err
    if any(len(s) != len(axes) for s in shapes) or len(shapes[0]) < 2:
        raise ValueError(f"{path}: its {len(axes)} axes do not match its levels' shapes {shapes}")
    channels = [i for i, a in enumerate(axes) if a.get("type") == "channel" or a["name"].lower() == "c"]
    scales, translations = level_transforms(multiscale, len(axes), str(path))
    return OmeZarrImage(path, format_from_version(version), axes, channels[0] if channels else None, paths, shapes,
                        scales, translations)
