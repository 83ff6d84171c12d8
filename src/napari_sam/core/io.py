"""Reading images and writing label images: TIFF, Zarr (v2, v3, OME-Zarr), NumPy, PNG/JPEG.

Zarr inputs are returned as zarr arrays (lazy: nothing is read until indexed), so a
volume larger than memory can be opened; everything else is read into memory.
Label images are written atomically: to a temporary name beside the target, then renamed,
so an interrupted write never leaves a half-written file under the real name.

Writing follows one rule (:func:`check_output`): an output is never an input (nor inside
one, nor around one), its folder must already exist and accept files, and replacing an
existing target is allowed only for the kind of thing this module writes: a TIFF or .npy
file, or a Zarr array that carries our label marker. A Zarr group, an OME-Zarr image or
any other folder is never deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["LABELS_MARKER", "read_image", "image_axes", "write_labels", "label_dtype", "check_output",
           "check_not_an_input", "check_folder_writable"]

_TIFF = (".tif", ".tiff")
_IMAGE = (".png", ".jpg", ".jpeg", ".bmp")
_LABEL_SUFFIXES = _TIFF + (".zarr", ".npy")
LABELS_MARKER = {"kind": "labels"}
"""The ``napari_sam`` attribute of every Zarr label array we write (files and
:func:`~napari_sam.core.label_target.create_label_store`): only such a store may be replaced."""


def _is_zarr(path: Path) -> bool:
    return (
        path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zarray").exists()
        or (path / ".zgroup").exists()
    )


def read_image(path: str | os.PathLike):
    """Open an image.

    Parameters
    ----------
    path
        A ``.tif``/``.tiff``, ``.npy``, ``.png``/``.jpg`` file, or a Zarr array or group.
        For a group, the OME-Zarr multiscales' full-resolution level is used, else the
        only array in the group.

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
    if _is_zarr(path):
        return _open_zarr_image(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise ValueError(f"cannot read {path}: a folder that is not a Zarr store")
    if suffix not in _TIFF + _IMAGE + (".npy",):
        raise ValueError(f"cannot read {path}: use TIFF, Zarr, .npy, PNG or JPEG")
    try:
        if suffix in _TIFF:
            import tifffile

            return tifffile.imread(path)
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        from skimage.io import imread

        return imread(path)
    except (PermissionError, MemoryError):
        raise
    except Exception as err:  # each reader has its own errors for a damaged file
        text = " ".join(str(err).split()) or type(err).__name__
        kind = "TIFF" if suffix in _TIFF else suffix.lstrip(".").upper()
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


def image_axes(path: str | os.PathLike) -> str | None:
    """Axis names (e.g. ``"TCZYX"``) that an OME-Zarr image declares, or None.

    Only OME-Zarr says what its axes are; for other files the caller names them.
    """
    path = Path(path).expanduser()
    if not _is_zarr(path):
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


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def check_not_an_input(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None],
                       what: str = "--out", inside_ok: bool = False) -> None:
    """Refuse an output that is an input, lies inside one or contains one.

    Parameters
    ----------
    output
        Where something will be written (a file, a Zarr store or a cache folder).
    inputs
        The inputs by what they are (``{"image": path, "seeds": path}``); None values are skipped.
    what
        How to name the output in the message (an option such as ``--out``).
    inside_ok
        Allow a new file inside an input folder (a folder of training pairs), though never
        inside a Zarr store.

    Raises
    ------
    ValueError
        Naming both paths.
    """
    out = _resolved(output)
    for name, path in inputs.items():
        if path is None:
            continue
        src = _resolved(path)
        same = out == src or (out.exists() and src.exists() and os.path.samefile(out, src))
        if same:
            relation = "is"
        elif out.is_relative_to(src) and not (inside_ok and src.is_dir() and not _is_zarr(src)):
            relation = "lies inside"
        elif src.is_relative_to(out):
            relation = "contains"
        else:
            continue
        raise ValueError(f"{what} {output} {relation} the {name} {path}: writing there would destroy an input; "
                         f"choose another path")


def check_folder_writable(folder: str | os.PathLike) -> None:
    """Raise unless ``folder`` exists, is a folder and accepts new files.

    Writability is tested by creating (and removing) a file there: permission bits say
    nothing about read-only mounts, ACLs or the super-user.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"the folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".napari-sam-probe-", dir=folder)
    except OSError as err:
        raise PermissionError(f"cannot write in the folder {folder}: {err.strerror or err}") from None
    os.close(fd)
    os.unlink(probe)


def _is_our_label_store(path: Path) -> bool:
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("node_type") == "array" and (meta.get("attributes") or {}).get("napari_sam") == LABELS_MARKER


def _is_our_label_tiff(path: Path) -> bool:
    """Whether a TIFF carries the marker :func:`write_labels` puts in its description."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            described = tif.shaped_metadata or ()
    except Exception:  # noqa: BLE001 - unreadable as a TIFF: not ours to replace
        return False
    return any(isinstance(d, dict) and d.get("napari_sam") == LABELS_MARKER for d in described)


def check_output(path: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None] | None = None,
                 overwrite: bool = False, what: str = "--out") -> Path:
    """Check, before any work, that a label image can be written to ``path``.

    Parameters
    ----------
    path
        Target: ``.tif``/``.tiff``, ``.zarr`` or ``.npy``.
    inputs
        Paths the command reads, by what they are: the target may be none of them, nor
        inside or around one (see :func:`check_not_an_input`).
    overwrite
        Allow replacing an existing target, which must then be of the kind written here:
        a TIFF or Zarr label array written by :func:`write_labels` (both carry its marker),
        or a .npy file (which has no room for one).
    what
        How to name the target in messages.

    Returns
    -------
    pathlib.Path
        The target, with ``~`` expanded.

    Raises
    ------
    ValueError
        An unknown suffix, an input as target, or a target that ``overwrite`` may not replace.
    FileExistsError
        The target exists and ``overwrite`` is False.
    FileNotFoundError, NotADirectoryError, PermissionError
        The target's folder is missing, not a folder, or not writable.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in _LABEL_SUFFIXES:
        raise ValueError(f"cannot write labels to {path}: use .tif, .zarr or .npy")
    check_not_an_input(path, inputs or {}, what)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
        if suffix == ".zarr":
            if path.is_symlink():  # a folder under a link cannot be replaced by a rename
                raise ValueError(f"{what} {path} is a symbolic link: give the path it points to")
            if not _is_our_label_store(path):
                raise ValueError(f"{what} {path} exists and is not a label array written by napari-sam (a Zarr "
                                 f"group, an image or another folder): --overwrite never deletes it; remove it "
                                 f"yourself or choose another path")
        elif not path.is_file():
            raise ValueError(f"{what} {path} exists and is not a file: --overwrite replaces only a "
                             f"{suffix} file; remove it yourself or choose another path")
        elif suffix in _TIFF and not _is_our_label_tiff(path):
            # an image (or labels from elsewhere) under the name: a typo must not destroy it
            raise ValueError(f"{what} {path} exists and is not a label image written by napari-sam: --overwrite "
                             f"never replaces it; remove it yourself or choose another path")
    check_folder_writable(path.parent)
    return path


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
        if suffix in _TIFF:
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
