"""Image planes with their instance labels, as training draws them.

A :class:`SegmentationDataset` is a list of 2D (image, label) planes read when first
needed: from arrays, from the planes of a 3D stack, or from a folder of files
(:func:`napari_sam.core.pairs.pair_files` finds the pairs), whose 3D label stacks
contribute one pair per labelled plane.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..core.label_target import check_label_ids
from ..core.pairs import pair_files, warn_if_a_mask
from ..model.checkpoint import PathLike

__all__ = ["SegmentationDataset", "TrainingPair", "object_ids"]


@dataclass(frozen=True)
class TrainingPair:
    """One training plane and its instance labels.

    Attributes
    ----------
    image
        (H, W) grayscale or (H, W, C) plane, any dtype.
    labels
        (H, W) integer instance labels, 0 = background.
    name
        Where it came from (file name, ``"z=12"``, ``"array 3"``).
    """

    image: np.ndarray
    labels: np.ndarray
    name: str


def _check_plane(image: np.ndarray, labels: np.ndarray, name: str) -> None:
    # Stricter than core.pairs.check_pair (training takes one 2D plane at a time) and
    # laxer too: a channels-first (C, H, W) plane is accepted.
    if labels.ndim != 2:
        raise ValueError(f"{name}: labels must be one 2D plane (H, W), got shape {labels.shape}")
    if labels.dtype.kind not in "iub":
        raise ValueError(f"{name}: labels must be integer instance ids, got dtype {labels.dtype}")
    check_label_ids(labels, f"{name}: the labels")
    if image.ndim not in (2, 3):
        raise ValueError(f"{name}: the image must be a 2D plane (H, W) or (H, W, C), got shape {image.shape}")
    if image.shape[:2] != labels.shape and not (image.ndim == 3 and image.shape[1:] == labels.shape):
        raise ValueError(f"{name}: image {image.shape} and labels {labels.shape} do not cover the same pixels")


def _file_shape(path: Path) -> tuple[int, ...]:
    """An image file's shape; a TIFF's read from its header (a stack is read once, later)."""
    from ..core.io import TIFF_SUFFIXES, read_image

    if path.suffix.lower() not in TIFF_SUFFIXES:
        return tuple(np.shape(read_image(path)))
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return tuple(tif.series[0].shape)
    except Exception as err:  # noqa: BLE001 - tifffile has its own errors for a damaged file
        raise ValueError(f"cannot read {path} as a TIFF image: {err}") from None


def object_ids(labels: np.ndarray, min_pixels: int = 1) -> np.ndarray:
    """Instance ids of a label plane with at least ``min_pixels`` pixels, sorted.

    Parameters
    ----------
    labels
        (H, W) integer labels, 0 = background.
    min_pixels
        Smaller objects are left out (a few pixels give no useful gradient and may vanish
        in the decoder's low-res frame).

    Returns
    -------
    numpy.ndarray
        The ids, background excluded.
    """
    ids, counts = np.unique(np.asarray(labels), return_counts=True)
    keep = (ids != 0) & (counts >= min_pixels)
    return ids[keep]


class SegmentationDataset:
    """(image plane, instance label plane) pairs for training.

    Build one with :meth:`from_arrays`, :meth:`from_folder` or :meth:`from_stack`; planes
    from files are read when first needed and then kept in memory.

    Parameters
    ----------
    loaders
        One callable per pair returning ``(image, labels)``.
    names
        A name per pair, for messages and provenance.
    description
        JSON-friendly description of the source (kept in checkpoints).
    channel_axis, channel
        How multichannel planes become RGB; see :func:`~napari_sam.core.preprocess.to_rgb`
        (``channel`` may also name how RGB is read, ``"rgb"`` or ``"haematoxylin"``; None:
        as the model advises).
    """

    def __init__(
        self,
        loaders: Sequence[Callable[[], tuple[np.ndarray, np.ndarray]]],
        names: Sequence[str],
        description: Mapping[str, Any] | None = None,
        channel_axis: int | None = None,
        channel: int | str | None = None,
    ):
        if len(loaders) != len(names):
            raise ValueError(f"{len(loaders)} loaders but {len(names)} names")
        self._loaders = list(loaders)
        self.names = [str(n) for n in names]
        self.description = dict(description or {"source": "custom"})
        self.channel_axis = channel_axis
        self.channel = channel
        self._loaded: dict[int, TrainingPair] = {}

    # -- constructors ------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        names: Sequence[str] | None = None,
        channel_axis: int | None = None,
        channel: int | str | None = None,
    ) -> "SegmentationDataset":
        """Pairs from in-memory planes.

        Parameters
        ----------
        images
            2D planes, (H, W) or (H, W, C).
        labels
            (H, W) integer instance labels, one per image.
        names
            Optional names; ``"array 0"``, ``"array 1"``, ... by default.
        channel_axis, channel
            See the class.

        Raises
        ------
        ValueError
            For unequal numbers of images and labels, an empty list, or a pair whose shapes
            do not match.
        """
        images, labels = list(images), list(labels)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} label planes")
        if not images:
            raise ValueError("no training pairs given")
        names = [f"array {i}" for i in range(len(images))] if names is None else list(names)
        pairs = []
        for img, lab, name in zip(images, labels, names):
            img, lab = np.asarray(img), np.asarray(lab)
            _check_plane(img, lab, name)
            pairs.append((img, lab))
        loaders = [(lambda p=p: p) for p in pairs]
        return cls(loaders, names, {"source": "arrays", "pairs": len(pairs)}, channel_axis, channel)

    @classmethod
    def from_stack(
        cls,
        image: np.ndarray,
        labels: np.ndarray,
        skip_empty: bool = True,
        channel: int | str | None = None,
        name: str = "stack",
    ) -> "SegmentationDataset":
        """Every z plane of a 3D stack as a pair.

        Parameters
        ----------
        image
            (Z, H, W) stack, or (Z, H, W, C) with channels last.
        labels
            (Z, H, W) instance labels.
        skip_empty
            Leave out planes without any labelled object.
        channel
            Channel to use for a multichannel stack that is not RGB.
        name
            Prefix of the plane names (``"stack z=3"``).

        Raises
        ------
        ValueError
            For shapes that are not stacks or do not match, or when no plane is left.
        """
        image, labels = np.asarray(image), np.asarray(labels)
        if labels.ndim != 3:
            raise ValueError(f"labels must be a (Z, H, W) stack, got shape {labels.shape}")
        if image.ndim not in (3, 4) or image.shape[:3] != labels.shape:
            raise ValueError(f"image {image.shape} must be (Z, H, W) or (Z, H, W, C) matching labels {labels.shape}")
        planes = [z for z in range(labels.shape[0]) if not skip_empty or labels[z].any()]
        if not planes:
            raise ValueError("the label stack holds no object in any plane")
        loaders = [(lambda z=z: (image[z], labels[z])) for z in planes]
        names = [f"{name} z={z}" for z in planes]
        desc = {"source": "stack", "name": name, "shape": list(labels.shape), "planes": planes}
        return cls(loaders, names, desc, -1 if image.ndim == 4 else None, channel)

    @classmethod
    def from_folder(
        cls,
        folder: PathLike,
        images: str = "images",
        labels: str = "labels",
        pattern: str = "*",
        skip_empty: bool = True,
        channel_axis: int | None = None,
        channel: int | str | None = None,
    ) -> "SegmentationDataset":
        """Pairs of image files (TIFF, PNG, JPEG, ``.npy``, as
        :func:`~napari_sam.core.io.read_image` reads them): ``folder/images/NAME`` with
        ``folder/labels/NAME``.

        A label file holding a 3D stack contributes each of its z planes (with the
        matching planes of the image file).

        Parameters
        ----------
        folder
            Holds the two subfolders.
        images, labels
            Their names.
        pattern
            Which image files to take (glob).
        skip_empty
            Leave out stack planes and 2D label files without objects (the files named in
            a warning).
        channel_axis, channel
            See the class.

        Raises
        ------
        ValueError
            When a folder is missing, holds no image, or an image has no label file.
        """
        from ..core.io import read_image

        root = Path(folder).expanduser()
        # pair_files' own layout (images/ and labels/) gives the clearer message when a
        # folder is missing; other subfolder names are passed as two folders.
        if (images, labels) == ("images", "labels"):
            files = pair_files(root, pattern=pattern)
        else:
            files = pair_files(root / images, root / labels, pattern)

        cache: dict[Path, tuple[np.ndarray, np.ndarray]] = {}

        def read(path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
            # A stack file is read once for all its planes.
            if path not in cache:
                cache.clear()
                cache[path] = (np.asarray(read_image(path)), np.asarray(read_image(label_path)))
            return cache[path]

        loaders, names, empty = [], [], []
        for path, label_path in files:
            shape = _file_shape(label_path)
            if len(shape) == 3 and shape[-1] in (3, 4):
                raise ValueError(f"{label_path}: the labels {tuple(shape)} look like a colour image; instance labels "
                                 "are one integer id per pixel (a 2D plane, or a stack of planes)")
            if len(shape) == 2:
                labels = np.asarray(read_image(label_path))
                if skip_empty and not labels.any():
                    empty.append(label_path.name)
                    continue
                warn_if_a_mask(labels, label_path.name)
                loaders.append(lambda p=path, q=label_path: read(p, q))
                names.append(path.name)
            elif len(shape) == 3:
                img, lab = read(path, label_path)
                if img.shape[0] != shape[0] or img.shape[1:3] != shape[1:]:
                    raise ValueError(f"{path.name}: the image {img.shape} and its label stack {tuple(shape)} do not "
                                     f"cover the same planes and pixels")
                for z in range(shape[0]):
                    if skip_empty and not lab[z].any():
                        continue
                    loaders.append(lambda p=path, q=label_path, z=z: (read(p, q)[0][z], read(p, q)[1][z]))
                    names.append(f"{path.name} z={z}")
            else:
                raise ValueError(f"{label_path}: labels must be 2D or a 3D stack, got shape {shape}")
        if empty:  # a plane without objects teaches nothing, and a split could leave only it to validate on
            shown = ", ".join(empty[:5]) + (f", ... ({len(empty) - 5} more)" if len(empty) > 5 else "")
            warnings.warn(f"{len(empty)} label file(s) in {root} hold no object and are left out: {shown}",
                          stacklevel=2)
        if not loaders:
            raise ValueError(f"no labelled plane found in {root}")
        desc = {"source": "folder", "path": str(root.resolve()), "files": len(files), "pairs": len(loaders)}
        return cls(loaders, names, desc, channel_axis, channel)

    # -- access ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._loaders)

    def __getitem__(self, index: int) -> TrainingPair:
        if not -len(self) <= index < len(self):
            raise IndexError(f"pair {index} of a dataset of {len(self)}")
        index %= len(self)
        if index not in self._loaded:
            image, labels = self._loaders[index]()
            image, labels = np.asarray(image), np.asarray(labels)
            _check_plane(image, labels, self.names[index])
            self._loaded[index] = TrainingPair(image, labels, self.names[index])
        return self._loaded[index]

    def subset(self, indices: Sequence[int]) -> "SegmentationDataset":
        """The pairs at ``indices``, as a new dataset."""
        indices = [int(i) % len(self) for i in indices]
        desc = dict(self.description, subset=indices)
        return SegmentationDataset(
            [self._loaders[i] for i in indices], [self.names[i] for i in indices], desc, self.channel_axis, self.channel
        )

    def split(
        self, validation_fraction: float = 0.1, seed: int = 0
    ) -> tuple["SegmentationDataset", "SegmentationDataset"]:
        """A random (training, validation) split; each part keeps at least one pair.

        Raises
        ------
        ValueError
            For a fraction outside (0, 1) or fewer than two pairs.
        """
        if not 0 < validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction}")
        if len(self) < 2:
            raise ValueError("splitting needs at least two pairs")
        order = np.random.default_rng(seed).permutation(len(self))
        n_val = min(len(self) - 1, max(1, round(validation_fraction * len(self))))
        return self.subset(sorted(order[n_val:])), self.subset(sorted(order[:n_val]))

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description of the data (what checkpoints record)."""
        names = self.names if len(self.names) <= 50 else self.names[:50] + [f"... ({len(self.names) - 50} more)"]
        channel = {} if self.channel is None else {"channel": self.channel}  # what the model learned to read
        return dict(self.description, pairs=len(self), names=names, **channel)
