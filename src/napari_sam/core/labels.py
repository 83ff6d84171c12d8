"""Writing object masks into label images without destroying existing work."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .label_journal import check_writer_gone, journal_path, noted, read_note

__all__ = ["Commit", "LabelWriter", "MAX_ID_ATTR", "next_free_id", "paint"]


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


MAX_ID_ATTR = "napari_sam_max_id"
"""Where a Zarr label array keeps its largest id, so that reopening a large volume needs no scan."""


@dataclass(frozen=True)
class Commit:
    """One committed step, enough to undo it.

    Attributes
    ----------
    plane
        Index of the plane in the label array's leading axes (``()`` for 2D labels).
    region
        ``(y0, y1, x0, x1)`` of the plane that was written.
    before, after
        The label values of that region before and after the commit.
    ids
        The ids given to the committed objects, in order (0 for an object that had no
        free pixel left to take).
    pixels
        Pixels written per object.
    """

    plane: tuple[int, ...]
    region: tuple[int, int, int, int]
    before: np.ndarray = field(repr=False)  # a region's pixels: the console would print them all
    ids: tuple[int, ...]
    pixels: tuple[int, ...]
    after: np.ndarray = field(repr=False)


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
    on_write
        Called as ``on_write(plane, region)`` after every change of ``labels`` in
        ``plane + (y0:y1, x0:x1)``: commits, undos, roll-backs and recoveries (a label
        pyramid keeps its lower levels current this way). On disk it runs while the write's
        note still exists, so a kill inside it is rolled back and redone on reopening.

    Notes
    -----
    The next free id is found once (chunk by chunk, through dask, for large arrays) and
    then counted up; for a Zarr array the largest id is also kept in its attributes so
    that reopening a large label volume needs no scan.

    A commit or undo on a Zarr array in a local folder survives a kill of the process:
    the new largest id is recorded before any pixel is written, and the region's earlier
    values are noted beside the array first. A writer opened on an array whose note was
    left by a dead process writes those values back (``recovered`` is then True), so an
    interrupted commit is absent as a whole, never half there. The undo history is kept
    in memory only: after a crash it is empty, never partial.
    """

    def __init__(self, labels, max_undo: int = 20,
                 on_write: Callable[[tuple[int, ...], tuple[int, int, int, int]], None] | None = None):
        if np.dtype(labels.dtype).kind not in "ui":
            raise ValueError(f"labels must have an integer dtype, not {labels.dtype}")
        if labels.ndim < 2:
            raise ValueError(f"labels must have at least 2 axes (Y, X), got shape {labels.shape}")
        self.labels = labels
        self.max_undo = max_undo
        self.on_write = on_write
        self._history: list[tuple[Commit, ...]] = []
        self._step: list[Commit] | None = None
        self._max_id: int | None = None
        self._journal = journal_path(labels)
        self.recovered = self._recover()

    @property
    def history(self) -> tuple[tuple[Commit, ...], ...]:
        """Undo steps, oldest first; a step is one commit or a group (see :meth:`one_step`)."""
        return tuple(self._history)

    def max_id(self) -> int:
        """The largest id in use."""
        if self._max_id is None:
            attrs = getattr(self.labels, "attrs", None)
            stored = None if attrs is None else dict(attrs).get(MAX_ID_ATTR)
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

    def _catch_up(self) -> None:
        """Take the largest id another writer has stored since we read it.

        A Zarr array's attributes are read once, when it is opened, so two sessions on one
        label store (two notebooks, a notebook beside the viewer) would otherwise hand out
        the same ids to different objects."""
        if not hasattr(self.labels, "store") or not hasattr(self.labels, "path"):
            return
        import zarr

        self.max_id()
        try:
            attrs = zarr.open_array(self.labels.store, path=self.labels.path, mode="r").attrs
            stored = int(attrs[MAX_ID_ATTR])  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - not a store we can reopen (in memory, removed), no id stored: keep ours
            return
        if stored > self.max_id():
            self._max_id = stored

    def _set_max_id(self, value: int) -> None:
        self._max_id = value
        attrs = getattr(self.labels, "attrs", None)
        if attrs is not None:
            attrs[MAX_ID_ATTR] = int(value)

    def commit(self, plane: tuple[int, ...], masks, overwrite: bool = False, ids=None, replace: bool = False) -> Commit:
        """Write objects into one plane under new ids.

        Parameters
        ----------
        plane
            Index of the plane in the leading axes of the label array.
        masks
            :class:`~napari_sam.core.masks.PlaneMask` objects (anything with
            ``region`` (y0, y1, x0, x1) and a bool ``mask`` crop), or whole-plane (H, W)
            boolean arrays.
        overwrite
            Also take pixels that belong to other objects; by default only background
            pixels are written, so earlier work is never damaged.
        ids
            Ids to use instead of the next free ones.
        replace
            Clear the ``ids``' earlier pixels on this plane first (an object written again keeps only its new ones).

        Returns
        -------
        Commit
        """
        plane = tuple(int(i) for i in plane)
        if len(plane) != self.labels.ndim - 2:
            raise ValueError(f"labels of shape {tuple(self.labels.shape)} need a plane index of "
                             f"{self.labels.ndim - 2} value(s), got {plane}")
        masks = [m if hasattr(m, "mask") else _whole_plane(m, self.labels.shape[-2:]) for m in masks]
        masks = [m for m in masks if m.mask.any()]
        if not masks:
            raise ValueError("nothing to commit: the objects are empty")
        H, W = self.labels.shape[-2:]
        for m in masks:
            y0, y1, x0, x1 = m.region
            if not (0 <= y0 < y1 <= H and 0 <= x0 < x1 <= W) or m.mask.shape != (y1 - y0, x1 - x0):
                raise ValueError(f"object region {m.region} does not fit the {H}x{W} label plane")
        boxes = [m.region for m in masks]
        self._catch_up()
        if ids is None and replace:
            raise ValueError("replace=True needs the ids of the objects written again")
        ids = [int(i) for i in (range(self.next_id(), self.next_id() + len(masks)) if ids is None else ids)]
        if len(ids) != len(masks):
            raise ValueError(f"{len(masks)} object(s) but {len(ids)} id(s)")
        if replace and (old := np.isin(np.asarray(self.labels[plane]), ids)).any():  # cover their earlier pixels
            rows, cols = np.nonzero(old)
            boxes.append((int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1))
        lo, hi = np.min(boxes, axis=0), np.max(boxes, axis=0)
        region = (int(lo[0]), int(hi[1]), int(lo[2]), int(hi[3]))
        index = plane + (slice(region[0], region[1]), slice(region[2], region[3]))
        before = np.array(self.labels[index])
        after = np.where(np.isin(before, ids), before.dtype.type(0), before) if replace else before.copy()
        written, used = [], []
        for m, label_id in zip(masks, ids):
            full = np.zeros(after.shape, bool)
            y0, y1, x0, x1 = m.region
            full[y0 - region[0] : y1 - region[0], x0 - region[2] : x1 - region[2]] = m.mask
            n = paint(after, full, label_id, overwrite)
            written.append(n)
            used.append(label_id if n else 0)
        commit = Commit(plane, region, before, tuple(used), tuple(written), after)
        if np.array_equal(after, before):  # nothing changed: no write, and no undo step that undoes nothing
            return commit
        self._write(plane, region, before, after, max(self.max_id(), max(used)))
        self._record(commit)
        return commit

    def erase(self, plane: tuple[int, ...], ids) -> Commit | None:
        """Clear the pixels of objects ``ids`` on one plane (other objects are untouched),
        as a commit that :meth:`undo` takes back; None when they have none there."""
        plane = tuple(int(i) for i in plane)
        ids = [int(i) for i in np.atleast_1d(ids) if int(i)]
        old = np.isin(np.asarray(self.labels[plane]), ids)
        if not old.any():
            return None
        rows, cols = np.nonzero(old)
        region = (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1)
        before = np.array(self.labels[plane + (slice(region[0], region[1]), slice(region[2], region[3]))])
        after = np.where(np.isin(before, ids), before.dtype.type(0), before)
        commit = Commit(plane, region, before, (), (), after)
        self._write(plane, region, before, after, self.max_id())
        self._record(commit)
        return commit

    def _record(self, commit: Commit) -> None:
        """One more undo step, or part of the step being made (:meth:`one_step`)."""
        if self._step is not None:
            self._step.append(commit)
        else:
            self._history.append((commit,))
            del self._history[: -self.max_undo]

    @contextmanager
    def one_step(self) -> Iterator[None]:
        """Commits made inside are one undo step however many planes they cover (a
        propagation or a whole volume segmented at once), also when the block is left by
        an exception or a cancel: what was written is undone together."""
        if self._step is not None:  # nested: the outer step takes them
            yield
            return
        self._step = []
        try:
            yield
        finally:
            step, self._step = tuple(self._step), None
            if step:
                self._history.append(step)
                del self._history[: -self.max_undo]

    def as_one_step(self, steps: Iterator) -> Iterator:
        """``steps`` (a generator that commits as it goes) passed through as one undo step."""
        with self.one_step():
            yield from steps

    def check_no_step_open(self) -> None:
        """Raise while a step is being made (a propagation whose generator is still open):
        a commit or an undo then would join it or cut it in half."""
        if self._step is not None:
            raise RuntimeError("a propagation is still open (its generator was neither run to the end nor "
                               "closed): finish it or close() it first")

    def undo(self) -> list[Commit]:
        """Undo the last step (one commit or a group); returns its commits, newest first,
        or an empty list when there is nothing to undo."""
        self.check_no_step_open()
        if not self._history:
            return []
        step = list(reversed(self._history.pop()))
        for commit in step:
            y0, y1, x0, x1 = commit.region
            current = np.array(self.labels[commit.plane + (slice(y0, y1), slice(x0, x1))])
            # only pixels the commit changed and nobody has changed since go back: a brush
            # stroke made in the region afterwards stays
            back = (current == commit.after) & (commit.after != commit.before)
            self._write(commit.plane, commit.region, current, np.where(back, commit.before, current), self.max_id())
        return step

    def note_id(self, label_id: int) -> None:
        """An id written outside this writer (a brush stroke in the viewer): later objects get ids above it."""
        if int(label_id) > self.max_id():
            self._set_max_id(int(label_id))

    def _write(self, plane: tuple[int, ...], region, before: np.ndarray, after: np.ndarray, max_id: int) -> None:
        """Replace ``before`` by ``after`` in one region, as one step that a kill cannot
        leave half done (see the class notes)."""
        y0, y1, x0, x1 = region
        index = plane + (slice(y0, y1), slice(x0, x1))
        old_max = self.max_id()
        with noted(self._journal, plane, region, before, old_max):
            try:
                # the id first: a kill between the two leaves an unused id, never an unrecorded one
                if max_id > old_max:
                    self._set_max_id(max_id)
                if isinstance(self.labels, np.ndarray):
                    # only the pixels this step changes: a brush stroke made in the viewer
                    # between reading the region and writing it stays (Zarr writes whole chunks)
                    changed = after != before
                    self.labels[index][changed] = after[changed]
                else:
                    self.labels[index] = after
                self._written(plane, region)
            except BaseException:
                # an error or Ctrl-C between chunks: put the region back as it was
                self._put_back(index, before)
                if max_id > old_max:
                    self._set_max_id(old_max)
                self._written(plane, region)  # a failure here keeps the note: reopening finishes the roll-back
                if self._journal is not None:
                    self._journal.unlink(missing_ok=True)
                raise

    def _put_back(self, index, before: np.ndarray) -> None:
        # zarr writes a region's chunks concurrently, and one failing does not cancel the
        # others: a chunk of the failed write can land after the roll-back, so it is read
        # back and repeated until it holds.
        for attempt in range(6):
            self.labels[index] = before
            if np.array_equal(np.asarray(self.labels[index]), before):
                return
            time.sleep(0.02 * 2**attempt)
        raise OSError(f"could not put labels {index} back after a failed write")

    def _recover(self) -> bool:
        """Roll back a write that a dead process left half done; True if there was one."""
        if self._journal is None or not self._journal.exists():
            return False
        note = read_note(self._journal)
        check_writer_gone(self._journal, note)
        plane, (y0, y1, x0, x1), before, old_max = note.plane, note.region, note.before, note.max_id
        self.labels[plane + (slice(y0, y1), slice(x0, x1))] = before
        if self.max_id() != old_max:
            self._set_max_id(old_max)
        self._written(plane, (y0, y1, x0, x1))
        self._journal.unlink(missing_ok=True)
        return True

    def _written(self, plane: tuple[int, ...], region) -> None:
        if self.on_write is not None:
            y0, y1, x0, x1 = (int(i) for i in region)
            self.on_write(tuple(plane), (y0, y1, x0, x1))


def _whole_plane(mask, shape):
    """A whole-plane boolean array as a PlaneMask (what :meth:`LabelWriter.commit` writes)."""
    from .masks import PlaneMask

    mask = np.asarray(mask)
    if mask.shape != tuple(shape) or mask.dtype.kind not in "bui":
        raise ValueError(f"an object is a PlaneMask or a boolean {tuple(shape)} plane, not a {mask.dtype} array of "
                         f"shape {mask.shape}")
    return PlaneMask.from_full(mask.astype(bool))
