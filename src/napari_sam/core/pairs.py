"""Images with their instance labels, as training and evaluation read them from disk.

One layout is understood everywhere (``napari-sam train``, ``napari-sam evaluate``, the
Python API): a folder holding ``images/`` and ``labels/`` with files of the same names,
or two such folders given separately. Label images are integer instance ids, 0 being
background, covering the same pixels as their image (2D planes, or 3D stacks whose
planes pair up).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from .label_target import check_label_ids

__all__ = ["check_pair", "pair_files", "read_pair", "warn_if_a_mask"]


def pair_files(
    images: str | os.PathLike, labels: str | os.PathLike | None = None, pattern: str = "*"
) -> list[tuple[Path, Path]]:
    """The (image file, label file) pairs of a folder layout, sorted by name.

    Parameters
    ----------
    images
        A folder with ``images/`` and ``labels/`` subfolders, or (with ``labels``) the
        folder of images itself.
    labels
        The folder of label images, named as their images; None for the subfolder layout.
    pattern
        Which image files to take (glob); of those, the files
        :func:`~napari_sam.core.io.read_image` reads (TIFF, PNG, JPEG, ``.npy``).

    Raises
    ------
    ValueError
        When a folder is missing, holds no matching image, or an image has no label file;
        the message names the folder and the first missing files.
    """
    root = Path(images).expanduser()
    if labels is None:
        img_dir, lab_dir = root / "images", root / "labels"
    else:
        img_dir, lab_dir = root, Path(labels).expanduser()
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            hint = "expected images/ and labels/ with files of the same names" if labels is None else "not a folder"
            raise ValueError(f"no folder {d}: {hint}")
    files = sorted(p for p in img_dir.glob(pattern) if _wanted(p))
    if not files:
        raise ValueError(f"no image files (TIFF, PNG, JPEG or .npy) matching {pattern!r} in {img_dir}")
    missing = [p.name for p in files if not (lab_dir / p.name).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
        paired = {p.suffix.lower() for p in files if p.name not in missing}
        unpaired = {Path(m).suffix.lower() for m in missing}
        # previews or thumbnails of another format beside the images (every image file is taken)
        hint = ""
        if paired and not paired & unpaired:
            # a pattern is offered only where one suffix, spelt as the files spell it, takes them all
            spelt = {p.suffix for p in files if p.name not in missing}
            take = f"'*{spelt.pop()}'" if len(spelt) == 1 else None
            hint = (f" (only the {', '.join(sorted(paired))} files have labels: keep other files out of "
                    f"{img_dir.name}/" + (f", or take only those with --pattern {take} or pattern={take})" if take
                                          else ")"))
        raise ValueError(
            f"{len(missing)} image(s) in {img_dir} have no label file of the same name in {lab_dir}: {shown}{hint}"
        )
    names = {p.name for p in files}
    orphans = sorted(p.name for p in lab_dir.glob(pattern) if _wanted(p) and p.name not in names)
    if orphans:  # a misnamed image would lose its labels unnoticed
        shown = ", ".join(orphans[:5]) + (f", ... ({len(orphans) - 5} more)" if len(orphans) > 5 else "")
        warnings.warn(f"{len(orphans)} label file(s) in {lab_dir} have no image of the same name in {img_dir} and "
                      f"are not used: {shown}", stacklevel=2)
    return [(p, lab_dir / p.name) for p in files]


def _wanted(path: Path) -> bool:
    from .io import IMAGE_FILE_SUFFIXES

    # Hidden files are not images (macOS leaves "._name.tif" beside every file it copies),
    # nor is a checkpoint "a.tif.pth" that *.tif* also matches.
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_FILE_SUFFIXES


def check_pair(image: np.ndarray, labels: np.ndarray, name: str) -> None:
    """Raise ValueError (naming the pair) unless ``labels`` are integer ids covering the
    pixels of ``image`` (whose trailing channel axis, if any, is ignored); warn where the
    labels look like a mask rather than instances (one id in many separate pieces)."""
    if labels.dtype.kind not in "iub":
        raise ValueError(f"{name}: labels must be integer instance ids, got dtype {labels.dtype}")
    if labels.ndim == 3 and labels.shape[-1] in (3, 4) and image.shape[-1] == labels.shape[-1]:
        raise ValueError(f"{name}: the labels {labels.shape} look like a colour image; instance labels are one "
                         "integer id per pixel (a 2D plane, or a stack of planes)")
    if image.shape[: labels.ndim] != labels.shape:
        first = " (channels first? images are read with their channels last)" if image.shape[1:] == labels.shape else ""
        raise ValueError(f"{name}: image {image.shape} and labels {labels.shape} do not cover the same pixels{first}")
    check_label_ids(labels, f"{name}: the labels")
    warn_if_a_mask(labels, name)


def warn_if_a_mask(labels: np.ndarray, name: str) -> None:
    """A binary mask (0/255, 0/1) read as labels is one object covering every cell."""
    from scipy import ndimage

    ids = np.unique(labels[labels > 0][:: max(1, labels.size // 1_000_000)])
    if len(ids) != 1:
        return
    plane = labels if labels.ndim == 2 else labels[labels.shape[0] // 2]
    pieces = ndimage.label(plane == ids[0])[1]
    if pieces >= 5:
        warnings.warn(f"{name}: the labels hold one id ({ids[0]}) in {pieces} separate pieces: a mask rather than "
                      "instance labels? Give each object its own id (skimage.measure.label)", stacklevel=3)


def read_pair(image_file: str | os.PathLike, label_file: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one pair of files (any format :func:`~napari_sam.core.io.read_image`
    reads); returns (image, labels) as numpy arrays."""
    from .io import read_image

    image, labels = np.asarray(read_image(image_file)), np.asarray(read_image(label_file))
    check_pair(image, labels, Path(image_file).name)
    return image, labels
