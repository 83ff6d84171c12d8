"""Labels as NGFF label images inside an OME-Zarr image container.

An OME-Zarr image keeps its segmentations beside it: ``IMAGE.ome.zarr/labels/<name>`` is a
multiscale integer image with ``image-label`` metadata pointing back at the image, and the
``labels`` group lists its name, so that NGFF readers (napari-ome-zarr among them) find
it and overlay it on the image. A label image made here mirrors the image:
the same number of levels with the same shapes (minus the channel axis), axes, scales and
translations; level 0 carries napari-sam's marker and largest id.

Only ``labels/<name>`` (and the ``labels`` group's list of names) is ever written: the
image's arrays and metadata are left as they are. A label image is built under a hidden
staging name inside ``labels/`` and renamed into place, so an interrupted write never
leaves half a label image under the real name. Lower levels follow level 0 through
:mod:`~napari_sam.core.label_pyramid` (one sampling rule for building and updating).

Metadata is read and written with ome-zarr-py (``ome_zarr``), OME's reference
implementation, for NGFF 0.4 (Zarr v2) and 0.5 (Zarr v3); a label image is written in the
version of its image.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .label_pyramid import downsample, level_factors, update_levels
from .labels import MAX_ID_ATTR
from .ngff_image import OmeZarrImage, axis_letters, is_ome_zarr, level_transforms, ngff_version, read_ome_zarr
from .outputs import LABELS_MARKER, check_folder_writable
from .staging import clean_staging, make_staging, swap_in

__all__ = ["LabelImage", "check_label_target", "is_ome_zarr", "ngff_version", "open_label_image",
           "write_label_image"]

SOURCE = {"image": "../../"}
"""``image-label`` ``source``: from ``labels/<name>`` back to the image."""


@dataclass(eq=False)
class LabelImage:
    """An NGFF label image ``labels/<name>`` of an OME-Zarr image, open for writing.

    Attributes
    ----------
    container
        The OME-Zarr image (the folder holding ``labels/``).
    name
        The label image's name under ``labels/``.
    levels
        Its zarr arrays, opened read-write, level 0 (full resolution) first; each has the
        image's shape at that level without the C axis, e.g. (Z, Y, X).
    axes
        Axis letters of the levels, e.g. ``"ZYX"`` (the image's axes without C).
    scales, translations
        Per level, the scale and translation per axis as the metadata declares them (the
        level's own transforms composed with the multiscale's).
    """

    container: Path
    name: str
    levels: list[Any]
    axes: str
    scales: list[tuple[float, ...]]
    translations: list[tuple[float, ...]]
    factors: list[tuple[float, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.factors = level_factors([tuple(a.shape) for a in self.levels], self.scales)

    @property
    def path(self) -> Path:
        """``container / "labels" / name``."""
        return self.container / "labels" / self.name

    @property
    def data(self):
        """Level 0, the full-resolution label array that objects are committed into."""
        return self.levels[0]

    def update(self, plane: tuple[int, ...], region: tuple[int, int, int, int]) -> None:
        """Bring the lower levels up to date after level 0 changed in ``plane + (y0:y1, x0:x1)``.

        Recomputes exactly the lower-level pixels whose source pixel lies in that region
        (see :mod:`~napari_sam.core.label_pyramid`); other chunks are not touched.

        Parameters
        ----------
        plane
            Index over the leading axes of level 0, e.g. ``(z,)`` (``()`` for YX labels).
        region
            ``(y0, y1, x0, x1)`` in level-0 pixels.
        """
        y0, y1, x0, x1 = (int(i) for i in region)
        update_levels(self.levels, self.factors, tuple(int(i) for i in plane), (y0, y1, x0, x1))


def _open_group(group, container: Path, name: str, where: Path) -> LabelImage:
    from ome_zarr.writer import get_metadata

    multiscales = get_metadata(group).get("multiscales")
    if not multiscales:
        raise ValueError(f"{where} is not a label image: it has no multiscales metadata")
    axes = multiscales[0].get("axes", [])
    try:
        levels = [group[str(ds["path"])] for ds in multiscales[0]["datasets"]]
    except KeyError as err:
        raise ValueError(f"{where}: the multiscales name a level {err} that is not there") from err
    if any(a.ndim != len(axes) or a.ndim < 2 for a in levels):
        raise ValueError(f"{where}: its levels {[tuple(a.shape) for a in levels]} do not match its axes {axes}")
    scales, translations = level_transforms(multiscales[0], len(axes), str(where))
    return LabelImage(container, name, levels, axis_letters(axes), scales, translations)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"label image name {name!r}: give a plain name without '/' that does not start with '.'")


def _check_writable(image: OmeZarrImage) -> None:
    folder = image.path / "labels"
    check_folder_writable(folder if folder.is_dir() else image.path)


def _settle(image: OmeZarrImage) -> None:
    """Put back what a dead writer left moved aside (see :mod:`~napari_sam.core.staging`)
    before a name under ``labels/`` is looked at: a label image cut off between the two
    renames of its replacement then counts as existing, and is never replaced unasked."""
    folder = image.path / "labels"
    if folder.is_dir():
        clean_staging(folder)


_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def _label_axes(image: OmeZarrImage) -> list[dict]:
    """The image's axes without C, each with its type: NGFF says an axis SHOULD have one,
    and ome-zarr-py refuses to write more than one without, so the usual names get theirs."""
    axes = [dict(a) for i, a in enumerate(image.axes) if i != image.channel]
    for a in axes:
        if "type" not in a and str(a.get("name", "")).lower() in _AXIS_TYPES:
            a["type"] = _AXIS_TYPES[str(a["name"]).lower()]
    return axes


def _check_target(image: OmeZarrImage, name: str, shape: Sequence[int] | None, overwrite: bool) -> Path:
    from ome_zarr.axes import Axes

    try:  # what writing the label image's metadata will ask of the axes, asked before any work
        Axes(_label_axes(image), fmt=image.fmt)
    except ValueError as err:
        raise ValueError(f"no label image can be written beside {image.path}: its axes {image.axes} do not "
                         f"make valid label axes ({err})") from None
    if shape is not None and tuple(int(n) for n in shape) != image.label_shape:
        raise ValueError(f"labels of shape {tuple(shape)} do not fit the OME-Zarr image {image.path}: its label "
                         f"images have shape {image.label_shape} (axes {image.label_axes})")
    _settle(image)
    target = image.path / "labels" / name
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise FileExistsError(f"the label image {target} exists; pass --overwrite (overwrite=True) to replace it")
        if target.is_symlink() or not ((target / "zarr.json").is_file() or (target / ".zgroup").is_file()):
            raise ValueError(f"{target} is not a label image (a link, a file or a folder without a Zarr group): "
                             "--overwrite never deletes it; remove it yourself or choose another name")
        check_folder_writable(target)  # a folder is moved aside only when it can be written (its '..' changes)
    _check_writable(image)
    return target


def check_label_target(image_path: str | os.PathLike, name: str, *, shape: Sequence[int] | None = None,
                       overwrite: bool = False) -> Path:
    """Check, before any work, that labels of ``shape`` may be written into ``labels/<name>``.

    Parameters
    ----------
    image_path
        The OME-Zarr image (NGFF 0.4 or 0.5).
    name
        The label image's name: no ``/``, not starting with ``.``.
    shape
        The labels' shape: the image's level-0 shape without the C axis (e.g. (Z, Y, X)).
    overwrite
        Allow replacing an existing label image of that name.

    Returns
    -------
    pathlib.Path
        ``image_path/labels/<name>``.

    Raises
    ------
    ValueError
        Not an OME-Zarr image, a bad name, a shape that does not fit, or an existing
        ``labels/<name>`` that is not a label image (never deleted).
    FileExistsError
        ``labels/<name>`` exists and ``overwrite`` is False.
    PermissionError
        The container does not accept new files.
    """
    _check_name(name)
    return _check_target(read_ome_zarr(image_path), name, shape, overwrite)


def open_label_image(image_path: str | os.PathLike, name: str, *, create: bool = True, overwrite: bool = False,
                     dtype="uint32", chunks: tuple[int, int] = (512, 512)) -> LabelImage:
    """Open ``labels/<name>`` of an OME-Zarr image for annotating, creating it if needed.

    Parameters
    ----------
    image_path
        The OME-Zarr image (NGFF 0.4 or 0.5). Its arrays and metadata are never written.
    name
        The label image's name.
    create
        Create an empty label image when there is none (else FileNotFoundError).
    overwrite
        Replace an existing label image of that name by an empty one. Without it an
        existing one is opened to continue annotating, if its level 0 has the image's
        shape (without C) and an integer dtype.
    dtype
        Integer dtype of a new label image.
    chunks
        (Y, X) chunk size of a new label image's levels (leading axes: one plane per chunk).

    Returns
    -------
    LabelImage

    Raises
    ------
    ValueError, FileExistsError, PermissionError
        As :func:`check_label_target`; or an existing label image that does not fit.
    FileNotFoundError
        No label image of that name and ``create`` is False.
    """
    import zarr

    _check_name(name)
    image = read_ome_zarr(image_path)
    _settle(image)
    target = image.path / "labels" / name
    if (target.exists() or target.is_symlink()) and not overwrite:
        try:
            group = zarr.open_group(str(target), mode="r+")
        except Exception as err:  # noqa: BLE001 - a folder or file that is not a Zarr group
            raise ValueError(f"{target} exists and is not a label image: choose another name") from err
        label = _open_group(group, image.path, name, target)
        if tuple(label.data.shape) != image.label_shape or np.dtype(label.data.dtype).kind not in "ui":
            raise ValueError(f"the label image {target} holds {label.data.dtype} labels of shape "
                             f"{tuple(label.data.shape)}, not integer labels of shape {image.label_shape}: "
                             "choose another name, or pass overwrite=True (--overwrite) to replace it")
        check_folder_writable(target / str(label.data.store_path.path))
        _list_label(image, name)  # a create cut short between its rename and its listing
        return label
    if not target.exists() and not create:
        raise FileNotFoundError(f"{image.path} has no label image {name!r} ({target})")
    _check_target(image, name, None, overwrite)
    if np.dtype(dtype).kind != "u":
        raise ValueError(f"label images have an unsigned integer dtype, not {np.dtype(dtype)}")
    return _create(image, name, np.dtype(dtype), chunks, replace=overwrite)


def write_label_image(image_path: str | os.PathLike, name: str, labels: np.ndarray, *, overwrite: bool = False,
                      colors: Mapping[int, Sequence[int]] | None = None,
                      properties: Mapping[int, Mapping[str, Any]] | None = None,
                      plane: tuple[int, ...] | None = None, chunks: tuple[int, int] = (512, 512)) -> LabelImage:
    """Write a whole label image with its pyramid into ``labels/<name>``, atomically.

    Parameters
    ----------
    image_path
        The OME-Zarr image (NGFF 0.4 or 0.5).
    name
        The label image's name.
    labels
        Integer (or bool) labels of the image's level-0 shape without the C axis, e.g.
        (Z, Y, X); or, with ``plane``, one (Y, X) plane (the other planes are background).
        Stored as uint32 (uint64 for larger ids).
    overwrite
        Replace an existing label image of that name; without it that is a FileExistsError.
    colors
        Optional display colours: ``{label: (r, g, b, a)}`` with values 0-255.
    properties
        Optional per-label properties: ``{label: {"class": "nucleus", ...}}``.
    plane
        Index over the leading axes of the plane that ``labels`` is.
    chunks
        (Y, X) chunk size of the levels (leading axes: one plane per chunk).

    Returns
    -------
    LabelImage
        The label image as written.

    Raises
    ------
    ValueError, FileExistsError, PermissionError
        As :func:`check_label_target`; nothing is written then.
    """
    labels = np.asarray(labels)
    if labels.dtype.kind not in "biu" or (labels.dtype.kind == "i" and labels.size and labels.min() < 0):
        raise ValueError(f"labels must hold non-negative integers, not {labels.dtype} values")
    _check_name(name)
    image = read_ome_zarr(image_path)
    shape = tuple(labels.shape)
    if plane is not None:
        plane = tuple(int(p) for p in plane)
        lead = image.label_shape[:-2]
        if labels.ndim != 2 or len(plane) != len(lead) or any(not 0 <= p < n for p, n in zip(plane, lead)):
            raise ValueError(f"a {labels.shape} plane at {plane} does not fit the OME-Zarr image {image.path}: its "
                             f"label images have shape {image.label_shape} (axes {image.label_axes})")
        shape = lead + shape
    _check_target(image, name, shape, overwrite)
    top = int(labels.max()) if labels.size else 0

    def fill(staged: LabelImage) -> None:
        if plane is None:
            staged.data[...] = labels
            for level, f in zip(staged.levels[1:], staged.factors[1:]):
                level[...] = downsample(labels, level.shape, f)
        else:
            staged.data[plane] = labels
            staged.update(plane, (0, labels.shape[0], 0, labels.shape[1]))
        staged.data.attrs[MAX_ID_ATTR] = top

    dtype = np.dtype(np.uint32 if top <= np.iinfo(np.uint32).max else np.uint64)
    return _create(image, name, dtype, chunks, fill, colors, properties, replace=overwrite)


def _create(image: OmeZarrImage, name: str, dtype: np.dtype, chunks: tuple[int, int],
            fill: Callable[[LabelImage], None] | None = None, colors: Mapping | None = None,
            properties: Mapping | None = None, *, replace: bool) -> LabelImage:
    """Build ``labels/<name>`` under a staging name and rename it into place (replacing one
    there only when ``replace``)."""
    import zarr
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    folder = image.path / "labels"
    zarr.open_group(str(folder), mode="a", zarr_format=image.fmt.zarr_format)  # the labels group, if new
    clean_staging(folder)
    staging = make_staging(folder)
    try:
        parent = zarr.open_group(str(staging), mode="w", zarr_format=image.fmt.zarr_format)
        group = parent.create_group(name)
        v2 = image.fmt.zarr_format == 2
        label_axes = _label_axes(image)
        for k, (path, shape) in enumerate(zip(image.paths, image.shapes)):
            shape = image.drop_channel(shape)
            extra: dict[str, Any] = ({"chunk_key_encoding": {"name": "v2", "separator": "/"}} if v2
                                     else {"dimension_names": [a["name"] for a in label_axes]})
            group.create_array(path, shape=shape, dtype=dtype, fill_value=0,
                               chunks=(1,) * (len(shape) - 2) + tuple(min(c, s) for c, s in zip(chunks, shape[-2:])),
                               attributes={"napari_sam": dict(LABELS_MARKER), MAX_ID_ATTR: 0} if k == 0 else None,
                               **extra)
        datasets = [{"path": path, "coordinateTransformations": [
            {"type": "scale", "scale": list(image.drop_channel(s))},
            {"type": "translation", "translation": list(image.drop_channel(t))}]}
            for path, s, t in zip(image.paths, image.scales, image.translations)]
        write_multiscales_metadata(group, datasets=datasets, fmt=image.fmt, axes=label_axes, name=name)
        write_label_metadata(parent, name, fmt=image.fmt, source=dict(SOURCE),
                             colors=None if colors is None else [
                                 {"label-value": int(k), "rgba": [int(c) for c in v]} for k, v in colors.items()],
                             properties=None if properties is None else [
                                 {"label-value": int(k), **dict(v)} for k, v in properties.items()])
        if fill is not None:
            fill(_open_group(group, image.path, name, staging / name))
        swap_in(staging, name, replace=replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _list_label(image, name)
    return _open_group(zarr.open_group(str(folder / name), mode="r+"), image.path, name, folder / name)


def _list_label(image: OmeZarrImage, name: str) -> None:
    """Add ``name`` to the ``labels`` group's list, where readers look for label images."""
    import zarr
    from ome_zarr.writer import add_metadata, get_metadata

    group = zarr.open_group(str(image.path / "labels"), mode="r+")
    meta = get_metadata(group)
    names = list(meta.get("labels", []))
    if name in names:
        return
    update: dict[str, Any] = {"labels": names + [name]}
    if image.fmt.version != "0.4":
        update["version"] = image.fmt.version  # 0.5 wants it on every OME group
    add_metadata(group, update, fmt=image.fmt)
