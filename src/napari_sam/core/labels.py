"""Writing object masks into label images without destroying existing work."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

__all__ = ["Commit", "LabelWriter", "create_label_store", "next_free_id", "paint"]


def next_free_id(labels) -> int:
    """One more than the largest id in ``labels`` (1 for an empty image)."""
    return int(np.max(labels)) + 1 if np.size(labels) else 1


def paint(labels: np.ndarray, mask: np.ndarray, label_id: int, overwrite: bool = False) -> int:
    """Write ``label_id`` where ``mask`` is true, in place.

    Parameters
    ----------
    labels
        Integer label image, modified in place.
    mask
        Boolean mask of the same shape.
    label_id
        Id to write; must fit the dtype of ``labels``.
    overwrite
        Also replace pixels that already belong to another object. By default only
        background (0) pixels are written, so earlier objects are never damaged.

    Returns
    -------
    int
        Number of pixels written.
    """
    if mask.shape != labels.shape:
        raise ValueError(f"mask shape {mask.shape} does not match labels shape {labels.shape}")
    if label_id <= 0:
        raise ValueError(f"label ids start at 1, got {label_id}")
    if np.issubdtype(labels.dtype, np.integer) and label_id > np.iinfo(labels.dtype).max:
        raise ValueError(f"id {label_id} does not fit labels of dtype {labels.dtype}")
    target = mask if overwrite else mask & (labels == 0)
    labels[target] = label_id
    return int(target.sum())


_MAX_ID_ATTR = "napari_sam_max_id"


@dataclass(frozen=True)
class Commit:
    """One committed step, enough to undo it.

    Attributes
    ----------
    plane
        Index of the plane in the label array's leading axes (``()`` for 2D labels).
    region
        ``(y0, y1, x0, x1)`` of the plane that was written.
    before
        The label values of that region before the commit.
    ids
        The ids given to the committed objects, in order (0 for an object that had no
        free pixel left to take).
    pixels
        Pixels written per object.
    """

    plane: tuple[int, ...]
    region: tuple[int, int, int, int]
    before: np.ndarray
    ids: tuple[int, ...]
    pixels: tuple[int, ...]


class LabelWriter:
    """Writes objects into a label array plane by plane, never over other objects unless
    asked, and undoes the last commits.

    Parameters
    ----------
    labels
        (..., H, W) integer array: numpy, or a zarr array on disk. A commit reads and
        writes only the bounding box of its objects, so with Zarr it touches only the
        chunks they cover, whatever the size of the volume.
    max_undo
        Commits kept for :meth:`undo`.

    Notes
    -----
    The next free id is found once (chunk by chunk, through dask, for large arrays) and
    then counted up; for a Zarr array the largest id is also kept in its attributes so
    that reopening a large label volume needs no scan.
    """

    def __init__(self, labels, max_undo: int = 20):
        if np.dtype(labels.dtype).kind not in "ui":
            raise ValueError(f"labels must have an integer dtype, not {labels.dtype}")
        if labels.ndim < 2:
            raise ValueError(f"labels must have at least 2 axes (Y, X), got shape {labels.shape}")
        self.labels = labels
        self.max_undo = max_undo
        self._history: list[tuple[Commit, ...]] = []
        self._max_id: int | None = None

    @property
    def history(self) -> tuple[tuple[Commit, ...], ...]:
        """Undo steps, oldest first; a step is one commit or a group (see :meth:`group`)."""
        return tuple(self._history)

    def max_id(self) -> int:
        """The largest id in use."""
        if self._max_id is None:
            attrs = getattr(self.labels, "attrs", None)
            stored = None if attrs is None else dict(attrs).get(_MAX_ID_ATTR)
            if stored is not None:
                self._max_id = int(stored)
            elif isinstance(self.labels, np.ndarray):
                self._max_id = int(self.labels.max()) if self.labels.size else 0
            else:
                import dask.array as da

                self._max_id = int(
                    da.from_array(self.labels, chunks=getattr(self.labels, "chunks", "auto")).max().compute()
                )
        return self._max_id

    def next_id(self) -> int:
        """The id the next object gets."""
        return self.max_id() + 1

    def _set_max_id(self, value: int) -> None:
        self._max_id = value
        attrs = getattr(self.labels, "attrs", None)
        if attrs is not None:
            attrs[_MAX_ID_ATTR] = int(value)

    def commit(self, plane: tuple[int, ...], masks, overwrite: bool = False, ids=None) -> Commit:
        """Write objects into one plane under new ids.

        Parameters
        ----------
        plane
            Index of the plane in the leading axes of the label array.
        masks
            :class:`~napari_sam.core.masks.PlaneMask` objects (anything with
            ``region`` (y0, y1, x0, x1) and a bool ``mask`` crop).
        overwrite
            Also take pixels that belong to other objects; by default only background
            pixels are written, so earlier work is never damaged.
        ids
            Ids to use instead of the next free ones.

        Returns
        -------
        Commit
        """
        plane = tuple(int(i) for i in plane)
        if len(plane) != self.labels.ndim - 2:
            raise ValueError(
                f"labels of shape {tuple(self.labels.shape)} need a plane index of {self.labels.ndim - 2} value(s), "
                f"got {plane}"
            )
        masks = [m for m in masks if m.mask.any()]
        if not masks:
            raise ValueError("nothing to commit: the objects are empty")
        H, W = self.labels.shape[-2:]
        for m in masks:
            y0, y1, x0, x1 = m.region
            if not (0 <= y0 < y1 <= H and 0 <= x0 < x1 <= W) or m.mask.shape != (y1 - y0, x1 - x0):
                raise ValueError(f"object region {m.region} does not fit the {H}x{W} label plane")
        region = (min(m.region[0] for m in masks), max(m.region[1] for m in masks),
                  min(m.region[2] for m in masks), max(m.region[3] for m in masks))
        index = plane + (slice(region[0], region[1]), slice(region[2], region[3]))
        before = np.array(self.labels[index])
        after = before.copy()
        if ids is None:
            first = self.next_id()
            ids = range(first, first + len(masks))
        ids = [int(i) for i in ids]
        if len(ids) != len(masks):
            raise ValueError(f"{len(masks)} object(s) but {len(ids)} id(s)")
        written, used = [], []
        for m, label_id in zip(masks, ids):
            full = np.zeros(after.shape, bool)
            y0, y1, x0, x1 = m.region
            full[y0 - region[0] : y1 - region[0], x0 - region[2] : x1 - region[2]] = m.mask
            n = paint(after, full, label_id, overwrite)
            written.append(n)
            used.append(label_id if n else 0)
        self.labels[index] = after
        if max(used) > self.max_id():
            self._set_max_id(max(used))
        commit = Commit(plane, region, before, tuple(used), tuple(written))
        self._history.append((commit,))
        del self._history[: -self.max_undo]
        return commit

    def group(self, count: int) -> None:
        """Make the last ``count`` commits one undo step (a propagation through many planes
        is undone at once)."""
        if count > 1 and len(self._history) >= count:
            merged = tuple(c for step in self._history[-count:] for c in step)
            self._history[-count:] = [merged]

    def undo(self) -> list[Commit]:
        """Undo the last step (one commit or a group); returns its commits, newest first,
        or an empty list when there is nothing to undo."""
        if not self._history:
            return []
        step = list(reversed(self._history.pop()))
        for commit in step:
            y0, y1, x0, x1 = commit.region
            self.labels[commit.plane + (slice(y0, y1), slice(x0, x1))] = commit.before
        return step


def create_label_store(path, shape: tuple[int, ...], chunks: tuple[int, int] = (512, 512), dtype="uint32"):
    """A chunked on-disk Zarr v3 label array of zeros, one plane per chunk along the
    leading axes, for label volumes larger than memory.

    An existing array at ``path`` is opened instead when its shape matches (annotation
    goes on where it stopped); a different shape is an error, so nothing is lost.
    """
    import zarr

    path = os.fspath(path)
    if os.path.exists(path):
        try:
            existing = zarr.open_array(path, mode="r+")
        except Exception as err:  # noqa: BLE001 - whatever it is, it is not ours to replace
            raise ValueError(f"{path} exists and is not a Zarr label array: choose another place") from err
        if tuple(existing.shape) != tuple(shape) or np.dtype(existing.dtype).kind not in "ui":
            raise ValueError(
                f"{path} holds {existing.dtype} labels of shape {tuple(existing.shape)}, not {tuple(shape)}: "
                "choose another place"
            )
        return existing
    chunk = tuple(1 for _ in shape[:-2]) + tuple(min(c, s) for c, s in zip(chunks, shape[-2:]))
    arr = zarr.create_array(path, shape=tuple(shape), chunks=chunk, dtype=dtype, fill_value=0, zarr_format=3)
    arr.attrs[_MAX_ID_ATTR] = 0
    return arr
