"""What an evaluation measures against: images with their instance labels, and the
objects sampled from them.

Pairs come from a folder (``images/`` + ``labels/`` with files of the same names: TIFF,
PNG, JPEG or ``.npy``; or a folder of images and a separate folder of labels, read by
:mod:`napari_sam.core.pairs`),
a Zarr group with ``images`` and ``labels`` arrays, or arrays (:func:`load_pairs`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.pairs import check_pair, pair_files, read_pair

__all__ = ["EvalPair", "load_pairs", "pairs_from_arrays", "sample_objects"]


@dataclass(frozen=True)
class EvalPair:
    """One image and its instance labels.

    Attributes
    ----------
    image
        (H, W) or (H, W, C) plane (or a (Z, H, W) volume for propagation).
    labels
        Integer instance labels covering the same pixels, 0 = background.
    name
        Where it came from.
    """

    image: np.ndarray
    labels: np.ndarray
    name: str


def pairs_from_arrays(images, labels, names: Sequence[str] | None = None) -> list[EvalPair]:
    """Pairs from stacks: (N, H, W[, C]) images and (N, H, W) labels, or one plane each."""
    images, labels = np.asarray(images), np.asarray(labels)
    if labels.ndim == 2:
        images, labels = images[None], labels[None]
    if labels.ndim != 3 or len(images) != len(labels):
        raise ValueError(
            f"expected (N, H, W) labels and N images, got images {images.shape} and labels {labels.shape}"
        )
    names = list(names) if names is not None else [f"image {i}" for i in range(len(labels))]
    if len(names) != len(labels):
        raise ValueError(f"{len(names)} names for {len(labels)} pairs")
    out = [EvalPair(images[i], labels[i], names[i]) for i in range(len(labels))]
    for p in out:
        check_pair(p.image, p.labels, p.name)
    return out


def load_pairs(
    source, labels: str | os.PathLike | None = None, *, image_key: str = "images", label_key: str = "labels",
    pattern: str = "*",
) -> list[EvalPair]:
    """Image/label pairs from a folder, two folders, a Zarr group or arrays.

    Parameters
    ----------
    source
        * a folder with ``images/`` and ``labels/`` holding files of the same names
          (TIFF, PNG, JPEG, ``.npy``; as ``../shared/data/dsb2018_fluo``);
        * with ``labels``: the folder of images itself;
        * a Zarr group (path) with arrays ``image_key`` and ``label_key``: one plane
          each, or stacks of planes along the first axis;
        * a sequence of ``(image, labels)`` tuples or :class:`EvalPair`.
    labels
        A folder of label images named as the images in the folder ``source``; None
        for the other layouts.
    image_key, label_key
        Array names in a Zarr group.
    pattern
        In the folder layouts: which image files to take (glob, e.g. ``"*.tif"``).

    Returns
    -------
    list of EvalPair
        Pairs read from files are named by the image file's stem.
    """
    if labels is not None:
        return _pairs_from_folder(source, labels, pattern)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"{path} does not exist")
        # A Zarr group first: its arrays are folders named like the TIFF folders.
        if path.is_dir() and any((path / f).exists() for f in ("zarr.json", ".zgroup")):
            import zarr

            group = zarr.open_group(str(path), mode="r")
            keys = set(group.array_keys())
            if image_key not in keys or label_key not in keys:
                raise ValueError(
                    f"Zarr group {path} needs arrays {image_key!r} and {label_key!r}, it has {sorted(keys)}"
                )
            return pairs_from_arrays(group[image_key][...], group[label_key][...])
        if (path / "images").is_dir() and (path / "labels").is_dir():
            return _pairs_from_folder(path, pattern=pattern)
        raise ValueError(f"{path} is neither a folder with images/ and labels/ nor a Zarr group")
    pairs = []
    for i, item in enumerate(source):
        if isinstance(item, EvalPair):
            pairs.append(item)
            continue
        try:
            image, lab = item
        except (TypeError, ValueError):
            raise ValueError(f"item {i}: expected an (image, labels) pair or an EvalPair") from None
        image, lab = np.asarray(image), np.asarray(lab)
        check_pair(image, lab, f"pair {i}")
        pairs.append(EvalPair(image, lab, f"pair {i}"))
    return pairs


def _pairs_from_folder(images, labels=None, pattern: str = "*") -> list[EvalPair]:
    return [EvalPair(*read_pair(img, lab), Path(img).stem) for img, lab in pair_files(images, labels, pattern)]


def sample_objects(
    labels: np.ndarray, min_area: int, max_objects: int | None, rng: np.random.Generator
) -> np.ndarray:
    """Sorted ids of the objects to prompt: those of at least ``min_area`` pixels (or
    voxels), ``max_objects`` of them drawn with ``rng`` when there are more."""
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    ids = ids[counts >= max(min_area, 1)]
    if max_objects is not None and len(ids) > max_objects:
        ids = np.sort(rng.choice(ids, size=max_objects, replace=False))
    return ids
