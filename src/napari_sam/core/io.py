"""Reading images and writing label images: TIFF, Zarr (v2, v3, OME-Zarr), NumPy, PNG/JPEG.

Zarr inputs are returned as zarr arrays (lazy: nothing is read until indexed), so a
volume larger than memory can be opened; everything else is read into memory.
Label images are written atomically: to a temporary name beside the target, then renamed,
so an interrupted write never leaves a half-written file under the real name.

Writing follows the output rule of :mod:`napari_sam.core.outputs`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .outputs import LABELS_MARKER, TIFF_SUFFIXES, check_output, is_zarr_path

__all__ = ["IMAGE_FILE_SUFFIXES", "read_image", "image_axes", "write_labels", "label_dtype"]

_IMAGE = (".png", ".jpg", ".jpeg", ".bmp")
IMAGE_FILE_SUFFIXES = TIFF_SUFFIXES + _IMAGE + (".npy",)
"""The files (not folders) read_image reads, by suffix."""

def read_image(path: str | os.PathLike):
    """Open an image.

    Parameters
    ----------
    path
        A ``.tif``/``.tiff``, ``.npy``, ``.png``/``.jpg`` file, or a Zarr array or group.
        For a group, the OME-Zarr multiscales' full-resolution level is used, else the
        only array in the group. An indexed (palette) PNG gives its indices, as label
        images are stored so.

    Returns
    -------
    numpy.ndarray or zarr.Array

    Raises
    ------
    ValueError
        For a missing path, an unknown format or a group without a usable array.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"no such image: {path}")
    if is_zarr_path(path):
        return _open_zarr_image(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise ValueError(f"cannot read {path}: a folder that is not a Zarr store")
    if suffix not in IMAGE_FILE_SUFFIXES:
        raise ValueError(f"cannot read {path}: use TIFF, Zarr, .npy, PNG or JPEG")
    try:
        if suffix in TIFF_SUFFIXES:
            return _read_tiff(path)
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        from PIL import Image

        with Image.open(path) as im:
            if im.mode == "P":  # an indexed PNG: label images store their ids so, not colours
                return np.asarray(im)
        from skimage.io import imread

        return imread(path)
    except (PermissionError, MemoryError):
        raise
    except Exception as err:  # each reader has its own errors for a damaged file
        text = " ".join(str(err).split()) or type(err).__name__
        kind = "TIFF" if suffix in TIFF_SUFFIXES else suffix.lstrip(".").upper()
        raise ValueError(f"cannot read {path} as a {kind} image: {text}") from err


def _multiscales(group, where: str = "the Zarr group") -> list | None:
    """OME-Zarr multiscales metadata (NGFF 0.4 in the attributes, 0.5 under ``ome``), None
    for a group without any; ValueError naming ``where`` for metadata that is malformed."""
    attrs = dict(group.attrs)
    ome = attrs.get("ome", {})
    if not isinstance(ome, dict):
        raise ValueError(f"{where}: its 'ome' metadata is a {type(ome).__name__}, not a mapping")
    multiscales = attrs.get("multiscales") or ome.get("multiscales")
    if multiscales is None:
        return None
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        raise ValueError(f"{where}: its OME-Zarr 'multiscales' metadata is not a list of images")
    datasets = multiscales[0].get("datasets")
    if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict) \
            or not isinstance(datasets[0].get("path"), str):
        raise ValueError(f"{where}: its OME-Zarr 'multiscales' name no level ('datasets' with a 'path')")
    return multiscales


def zarr_image_folder(array) -> Path | None:
    """The folder a user names to open ``array``, for a Zarr array in a local folder.

    An OME-Zarr image's first level gives the image's folder (what :func:`read_image`
    opens for it), any other array its own folder; None for arrays not stored in a local
    folder (numpy, dask, remote stores). An array opened in a script then finds the
    embedding cache that ``napari-sam embed`` made for the same path.
    """
    root = getattr(getattr(array, "store", None), "root", None)
    if root is None or not hasattr(array, "path"):
        return None
    folder = Path(root) / str(array.path) if array.path else Path(root)
    import zarr

    try:
        multiscales = _multiscales(zarr.open_group(str(folder.parent), mode="r"))
    except Exception:  # noqa: BLE001 - the parent is no (well-formed) OME-Zarr group: the array stands alone
        multiscales = None
    if multiscales and str(multiscales[0]["datasets"][0]["path"]).strip("/") == folder.name:
        return folder.parent
    return folder


def _open_zarr_image(path: Path):
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as err:  # zarr reports a folder without metadata in several ways
        text = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"cannot read {path} as Zarr: {text}") from err
    if isinstance(node, zarr.Array):
        return node
    multiscales = _multiscales(node, str(path))
    if multiscales:
        level = multiscales[0]["datasets"][0]["path"]
        try:
            found = node[level]
        except Exception as err:  # noqa: BLE001 - missing, or metadata zarr cannot read
            text = " ".join(str(err).split()) or type(err).__name__
            raise ValueError(f"{path}: the OME-Zarr multiscales name the level {level!r}, which cannot be read "
                             f"({text})") from err
        if not isinstance(found, zarr.Array):
            raise ValueError(f"{path}: the OME-Zarr level {level!r} is a group, not an array")
        return found
    arrays = list(node.array_keys())
    if len(arrays) == 1:
        return node[arrays[0]]
    raise ValueError(f"{path} is a Zarr group with arrays {arrays}: give the path of one array")


class _TiffComplaints(logging.Filter):
    """Holds back the errors tifffile logs while this thread reads a TIFF through
    :func:`_open_tiff`, which turns them into one line (other threads' reads and tifffile's
    use elsewhere are untouched: the filter only acts where a read asked it to)."""

    local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        sink = getattr(self.local, "records", None)
        if sink is None:
            return True
        sink.append(record)
        return False


_COMPLAINTS = _TiffComplaints()


@contextlib.contextmanager
def _open_tiff(path: Path):
    """``(tif, complaints)``: a TiffFile, and the list that collects the records tifffile
    logs meanwhile (a damaged or cut-short file shows there, not as an exception)."""
    import tifffile

    log = logging.getLogger("tifffile")
    if _COMPLAINTS not in log.filters:
        log.addFilter(_COMPLAINTS)
    outer = getattr(_TiffComplaints.local, "records", None)
    complaints: list[logging.LogRecord] = []
    _TiffComplaints.local.records = complaints
    try:
        with tifffile.TiffFile(path) as tif:
            yield tif, complaints
    finally:
        _TiffComplaints.local.records = outer


def _read_tiff(path: Path) -> np.ndarray:
    """A TIFF's first series, as its pages hold it. ValueError for a file that is cut
    short (an interrupted copy) or damaged, which tifffile would read as the planes it
    finds, often the first alone, with an error in its log."""
    with _open_tiff(path) as (tif, complaints):
        announced = (tif.imagej_metadata or {}).get("images") if tif.is_imagej else None
        series = tif.series[0]
        planes = int(np.prod(series.shape[:-3 if series.axes.endswith("S") else -2], dtype=np.int64))
        if isinstance(announced, int) and planes < announced:
            raise ValueError(f"cut short or damaged: its ImageJ header announces {announced} planes, the file "
                             f"holds {planes}")
        data = series.asarray()
        errors = [r.getMessage() for r in complaints if r.levelno >= logging.ERROR]
        if errors:
            raise ValueError(f"cut short or damaged (tifffile: {' '.join(errors[0].split())[:160]})")
        return data


def planar_rgb(path: str | os.PathLike) -> bool:
    """Whether a TIFF declares RGB stored plane by plane ((3, H, W) in the file). tifffile
    writes every 3-plane uint8 stack so unless told otherwise, so the declaration alone
    does not say colour: readers keep the planes and name the choice."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return False
    try:
        with _open_tiff(path) as (tif, _):
            axes = tif.series[0].axes
    except Exception:  # noqa: BLE001 - not readable as a TIFF: read_image says why
        return False
    return 0 <= axes.find("S") < len(axes) - 1


def _tiff_axes(path: Path) -> str | None:
    """The axes an ImageJ hyperstack or an OME-TIFF declares (tifffile's "S", the samples
    of RGB, read as C), or None for a TIFF that declares none."""
    try:
        with _open_tiff(path) as (tif, _):
            declared = tif.is_imagej or tif.is_ome
            axes = tif.series[0].axes.replace("S", "C")
            by_tifffile = (tif.is_imagej and str((tif.imagej_metadata or {}).get("ImageJ")) == "1.11a") or (
                tif.is_ome and 'Creator="tifffile' in (tif.ome_metadata or ""))
    except Exception:  # noqa: BLE001 - not readable as a TIFF: read_image says why
        return None
    known = declared and set(axes) <= set("TZCYX") and len(set(axes)) == len(axes)
    # tifffile, unless told the axes, declares a plain stack's planes channels: only its
    # files that also name Z or T have said what their axes are
    if by_tifffile and "C" in axes and not set(axes) & set("TZ"):
        return None
    return axes if known else None


def image_axes(path: str | os.PathLike) -> str | None:
    """Axis names (e.g. ``"TCZYX"``) that an OME-Zarr image, an OME-TIFF or an ImageJ
    hyperstack declares, or None (the caller names them, or they are guessed)."""
    path = Path(path).expanduser()
    if path.suffix.lower() in TIFF_SUFFIXES:
        return _tiff_axes(path)
    if not is_zarr_path(path):
        return None
    import zarr

    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Array):
        return None
    multiscales = _multiscales(node, str(path))
    if not multiscales or "axes" not in multiscales[0]:
        return None
    names = [a.get("name") if isinstance(a, dict) else a for a in multiscales[0]["axes"]]
    letters = [n[0].upper() for n in names if isinstance(n, str) and n]
    if len(letters) != len(names):
        raise ValueError(f"{path}: its OME-Zarr axes {names} are not all named")
    return "".join(letters)


def label_dtype(max_id: int) -> np.dtype:
    """Smallest unsigned integer type that holds ``max_id``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_id <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def write_labels(path: str | os.PathLike, labels: np.ndarray, overwrite: bool = False,
                 inputs: Mapping[str, str | os.PathLike | None] | None = None) -> Path:
    """Write a label image as TIFF, Zarr (v3) or .npy, atomically.

    Parameters
    ----------
    path
        Target; the format follows the suffix (``.tif``, ``.tiff``, ``.zarr``, ``.npy``).
        Its folder must exist.
    labels
        Integer label image.
    overwrite
        Replace an existing target of the kind written here (see :func:`check_output`).
        Without it an existing target is an error, so that nothing is lost by accident.
    inputs
        Paths the target must not be, lie inside or contain.

    Returns
    -------
    pathlib.Path
        The target.

    Raises
    ------
    ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError
        As :func:`check_output`; nothing is written then.
    """
    path = check_output(path, inputs, overwrite)
    suffix = path.suffix.lower()
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp = staging / path.name
    try:
        if suffix in TIFF_SUFFIXES:
            import tifffile

            # minisblack: a 3-plane label volume must not be taken for an RGB image
            # the marker lets a later --overwrite tell this file from an image of the same name
            tifffile.imwrite(tmp, labels, compression="zlib", photometric="minisblack",
                             metadata={"napari_sam": dict(LABELS_MARKER)})
        elif suffix == ".npy":
            with open(tmp, "wb") as fh:  # np.save on a name would add ".npy" to "x.NPY"
                np.save(fh, labels)
        else:
            import zarr

            chunks = tuple(min(s, 1024) for s in labels.shape)
            arr = zarr.create_array(str(tmp), shape=labels.shape, dtype=labels.dtype, chunks=chunks, zarr_format=3,
                                    attributes={"napari_sam": dict(LABELS_MARKER)})
            arr[...] = labels
        old = None
        if path.is_dir() and not path.is_symlink():
            # A folder cannot be replaced in one rename: the old store moves aside first. Only
            # between these two renames is the name empty; a kill there leaves both stores,
            # complete, in the hidden staging folder beside the target.
            old = staging / ".old"
            os.replace(path, old)
        try:
            os.replace(tmp, path)  # a file is replaced in one step
        except BaseException:
            if old is not None:  # the staging folder is about to be removed: the old store goes back first
                os.replace(old, path)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
