"""Reading images and writing label images: TIFF, Zarr (v2, v3, OME-Zarr), NumPy, PNG/JPEG.

Zarr inputs are returned as zarr arrays (lazy: nothing is read until indexed), so a
volume larger than memory can be opened; everything else is read into memory.
Label images are written atomically: to a temporary name beside the target, then renamed,
so an interrupted write never leaves a half-written file under the real name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["read_image", "image_axes", "write_labels", "label_dtype"]

_TIFF = (".tif", ".tiff")
_IMAGE = (".png", ".jpg", ".jpeg", ".bmp")


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
    if suffix in _TIFF:
        import tifffile

        return tifffile.imread(path)
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix in _IMAGE:
        from skimage.io import imread

        return imread(path)
    raise ValueError(f"cannot read {path}: use TIFF, Zarr, .npy, PNG or JPEG")


def _multiscales(group) -> list | None:
    """OME-Zarr multiscales metadata (NGFF 0.4 in the attributes, 0.5 under ``ome``)."""
    attrs = dict(group.attrs)
    return attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")


def _open_zarr_image(path: Path):
    import zarr

    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Array):
        return node
    multiscales = _multiscales(node)
    if multiscales:
        return node[multiscales[0]["datasets"][0]["path"]]
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
    multiscales = _multiscales(node)
    if not multiscales or "axes" not in multiscales[0]:
        return None
    names = [a["name"] if isinstance(a, dict) else a for a in multiscales[0]["axes"]]
    return "".join(str(n)[0].upper() for n in names)


def label_dtype(max_id: int) -> np.dtype:
    """Smallest unsigned integer type that holds ``max_id``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_id <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def write_labels(path: str | os.PathLike, labels: np.ndarray, overwrite: bool = False) -> Path:
    """Write a label image as TIFF, Zarr (v3) or .npy, atomically.

    Parameters
    ----------
    path
        Target; the format follows the suffix (``.tif``, ``.tiff``, ``.zarr``, ``.npy``).
    labels
        Integer label image.
    overwrite
        Replace an existing target. Without it an existing file is an error, so that
        nothing is lost by accident.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in _TIFF + (".zarr", ".npy"):
        raise ValueError(f"cannot write labels to {path}: use .tif, .zarr or .npy")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        if suffix in _TIFF:
            import tifffile

            # minisblack: a 3-plane label volume must not be taken for an RGB image
            tifffile.imwrite(tmp, labels, compression="zlib", photometric="minisblack")
        elif suffix == ".npy":
            np.save(tmp, labels)
        else:
            import zarr

            chunks = tuple(min(s, 1024) for s in labels.shape)
            arr = zarr.create_array(str(tmp), shape=labels.shape, dtype=labels.dtype, chunks=chunks, zarr_format=3)
            arr[...] = labels
        if path.exists():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return path
