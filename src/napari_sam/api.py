"""The plugin's operations as a small Python API, for scripts, Jupyter and the napari console.

:class:`Annotator` needs no viewer: give it an image (numpy, dask, zarr; 2D to 4D) and a
model, then embed, segment from points and boxes, commit objects into a label array and
undo. The napari dock widget drives the very same object through :mod:`napari_sam.layers`,
so whatever the widget can do, a script can do too.

>>> from napari_sam.api import Annotator                              # doctest: +SKIP
>>> ann = Annotator(volume, model="vit_b_lm", axes="ZYX")              # doctest: +SKIP
>>> obj = ann.segment(12, points=[[310, 240]])                          # doctest: +SKIP
>>> ann.commit(12, [obj]).ids                                           # doctest: +SKIP
(1,)

In the napari console, :func:`napari_sam.layers.attach` connects an Annotator to the
viewer's layers:

>>> from napari_sam.layers import attach                                # doctest: +SKIP
>>> session = attach(viewer, viewer.layers["nuclei"], model="vit_b_lm")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

import numpy as np

from .core.embeddings import Embeddings, EmbedProgress
from .core.image_source import ImageSource
from .core.instance_commit import commit_instances
from .core.label_target import open_labels
from .core.labels import Commit, LabelWriter
from .core.masks import PlaneMask
from .core.memory_labels import Tracking, note_prompted, propagation_starts
from .core.memory_propagation import MemoryStep
from .core.ngff import LabelImage
from .core.object_scale import segment_at_object_scale
from .core.preprocess import Normalization
from .core.prompts import Prompt
from .core.propagation import PropagationSettings, PropagationStep, propagate
from .core.sam2_models import NoSam, split_models

if TYPE_CHECKING:  # pragma: no cover
    from .auto import Progress

__all__ = ["Annotator"]


class Annotator:
    """Segment objects of an image into a label image from point and box prompts.

    Parameters
    ----------
    image
        An :class:`~napari_sam.core.image_source.ImageSource`, an array with ``axes`` and
        ``channel``, or the path of an image file or Zarr store (``ImageSource.of``).
    model
        A loaded SAM, a registry name, a checkpoint file, or None for ``$NAPARI_SAM_MODEL``,
        else the default model shipped with the package
        (:func:`~napari_sam.core.models.resolve_model`). A SAM 2.1 here propagates (as
        ``tracker``) and the annotator has no SAM to segment with.
    labels
        Where objects go: an integer array whose shape is the image's planes and plane
        (e.g. (Z, Y, X) for a ZYX or ZYXC image), a path for a Zarr label array on disk
        (created, or reopened to continue), a :class:`~napari_sam.core.ngff.LabelImage`
        (an OME-Zarr label image, whose lower resolution levels follow every commit and
        undo; see :func:`~napari_sam.core.ngff.open_label_image`), or None for a new array
        (in memory up to 1 GiB, else an error asking for a path).
    cache, tile, halo, normalization, magnification, diameter
        See :class:`~napari_sam.core.embeddings.Embeddings`; the magnification chosen is
        ``annotator.embeddings.magnification``.
    device, dtype
        See :func:`~napari_sam.core.models.load_model` (used when ``model`` is not loaded).
    tracker
        A SAM 2.1 (loaded, registry name or checkpoint file) that :meth:`propagate` and
        :meth:`propagate_all` use, with its memory, instead of re-prompting SAM plane by
        plane (:class:`~napari_sam.core.memory_labels.Tracking`; features cached in ``cache``).
    """

    tracking: Tracking | None = None
    """Propagation with SAM 2 (None: SAM re-prompted plane by plane)."""

    def __init__(
        self,
        image,
        model=None,
        labels=None,
        *,
        axes: str | None = None,
        channel: int | str | None = None,
        cache: str | os.PathLike | None | bool = None,
        tile: int | None = None,
        halo: int | None = None,
        normalization: Normalization = Normalization(),
        device: str | None = None,
        dtype: str = "auto",
        tracker=None,
        magnification: float | str | None = None,
        diameter: float | None = None,
    ):
        self.source = ImageSource.of(image, axes, channel)
        self.model, sam2 = split_models(model, tracker, device, dtype)
        self.embeddings = NoSam(sam2.config.name) if self.model is None else Embeddings(
            self.source, self.model, cache, tile=tile, halo=halo, normalization=normalization,
            magnification=magnification, diameter=diameter)
        self.tracking = None if sam2 is None else Tracking(self.source, sam2, cache, normalization)
        self.label_image = labels if isinstance(labels, LabelImage) else None  # its lower levels follow level 0
        on_write = None if self.label_image is None else self.label_image.update
        self.writer = LabelWriter(open_labels(labels, self.labels_shape), on_write=on_write)

    @property
    def labels_shape(self) -> tuple[int, ...]:
        """Shape of the label image: the plane axes, then (Y, X)."""
        return self.source.plane_grid + self.source.plane_shape

    @property
    def labels(self):
        """The label array objects are committed into."""
        return self.writer.labels

    @property
    def label_levels(self) -> list:
        """The label array and, for an NGFF label image, its lower-resolution levels (full
        resolution first, each (planes..., Y, X)); what a viewer shows at each zoom."""
        return list(self.label_image.levels) if self.label_image is not None else [self.labels]

    def plane(self, plane) -> tuple[int, ...]:
        """A flat plane number or (t, z) tuple as the label array's leading index."""
        return self.source.plane_index(plane)

    # -- embedding -----------------------------------------------------------------------
    def warm_up(self) -> None:
        """Make the first click as fast as the later ones (traces the decoder, ~1 s);
        see :meth:`~napari_sam.core.embeddings.Embeddings.warm_up`."""
        self.embeddings.warm_up()

    def embed(self, plane=None, progress: bool = True) -> int:
        """Embed one plane (all its tiles) or, with ``plane=None``, every plane; returns
        the tiles cached."""
        return self.embeddings.compute_all(None if plane is None else [plane], progress=progress)

    def embed_steps(self, plane=None, scheduler=None) -> Iterator[EmbedProgress]:
        """:meth:`Embeddings.precompute` for one plane or all: a generator of progress
        that a GUI or a loop drives, and cancels by closing it."""
        return self.embeddings.precompute(None if plane is None else [plane], scheduler=scheduler)

    def is_embedded(self, plane) -> bool:
        """Whether every tile of the plane is cached."""
        return self.embeddings.plane_ready(plane)

    # -- prompts -------------------------------------------------------------------------
    def segment(self, plane, prompt: Prompt | None = None, *, points=None, labels=None, box=None,
                previous: PlaneMask | None = None, multimask: bool | None = None) -> PlaneMask:
        """One object on a plane; missing tiles are embedded first. A box, and a click's
        corrections, are answered at the magnification the object's size asks for where
        the model advises one (:func:`~napari_sam.core.object_scale.segment_at_object_scale`).

        Parameters
        ----------
        plane
            Flat plane number or (t, z) tuple.
        prompt
            A :class:`~napari_sam.core.prompts.Prompt`; or, instead, the keywords below.
        points
            (N, 2) as (x, y) = (column, row) plane pixels.
        labels
            (N,) 1 foreground, 0 background (default: all foreground).
        box
            (x0, y0, x1, y1) in plane pixels.
        previous
            The answer that these prompts correct (SAM's interactive loop).
        multimask
            Three candidates and the best kept; by default for a single point only.

        Returns
        -------
        PlaneMask
        """
        loose = points is not None or labels is not None or box is not None or previous is not None
        if prompt is None:
            prompt = Prompt.make(points, labels, box, previous)
        elif loose:
            raise ValueError("give either a Prompt or points/labels/box/previous, not both")
        return segment_at_object_scale(self.embeddings, plane, prompt, multimask)

    # -- results -------------------------------------------------------------------------
    def commit(self, plane, masks, overwrite: bool = False) -> Commit:
        """Write objects into one plane of :attr:`labels` under new ids (next free ones).
        Pixels of other objects are kept unless ``overwrite``."""
        self.writer.check_no_step_open()
        commit = self.writer.commit(self.plane(plane), list(masks), overwrite=overwrite)
        if self.tracking is not None:  # SAM 2 propagates from the planes objects were given on
            self.tracking.remember(commit.plane, commit.ids)
        note_prompted(self.writer.labels, {i: [commit.plane] for i in commit.ids})  # and a later session's
        return commit

    def object_mask(self, plane, label_id: int) -> PlaneMask:
        """The committed object ``label_id`` on a plane, as a PlaneMask."""
        mask = PlaneMask.from_full(np.asarray(self.labels[self.plane(plane)]) == label_id)
        if not mask.area:
            raise ValueError(f"object {label_id} is not on plane {self.plane(plane)}")
        return mask

    def propagate(self, plane, label_id: int, axis: str | None = None, settings=None,
                  overwrite: bool = False) -> Iterator[PropagationStep]:
        """Follow committed object ``label_id`` from ``plane`` through the neighbouring planes
        (both directions along ``axis``, Z by default, or T), writing each plane's mask
        under the same id as soon as it is known; a generator of progress.

        Stopping the iteration leaves every plane written so far in place; the whole
        propagation is one undo step. Other objects are kept unless ``overwrite``.
        ``settings``: :class:`~napari_sam.core.propagation.PropagationSettings`, or with a
        :attr:`tracking` SAM 2 :class:`~napari_sam.core.memory_propagation.MemorySettings`;
        there, ``plane`` becomes one of the object's prompted planes (a correction when it has
        others), and the planes it owns are rewritten (the object's own earlier pixels replaced).
        """
        if self.tracking is not None:
            yield from self.tracking.propagate(self.writer, self.plane(plane), label_id, axis, settings, overwrite)
            return
        start = self.object_mask(plane, label_id)
        with self.writer.one_step():
            for step in propagate(self.embeddings, plane, start, axis, settings or PropagationSettings()):
                if step.mask is not None:  # the object's earlier pixels there give way: propagating again corrects
                    self.writer.commit(step.plane, [step.mask], overwrite=overwrite, ids=[label_id], replace=True)
                yield step

    def propagate_all(self, axis: str | None = None, ids=None, settings=None, overwrite: bool = False,
                      progress: bool = True, seeds: str = "largest") -> dict[int, list[tuple[int, ...]]]:
        """Propagate every object (or those in ``ids``) from the plane where it is largest;
        with a SAM 2 (:attr:`tracking`), all at once from their prompted planes (``seeds``:
        see :class:`~napari_sam.core.memory_labels.Tracking`).

        Returns, per id, the planes it was written on.
        """
        from .core.progress_bar import progress_bar

        if self.tracking is not None:
            return self.tracking.propagate_all(self.writer, ids, axis, settings, overwrite, progress, seeds)
        if seeds != "largest":
            raise ValueError(f"seeds={seeds!r} is for propagation with SAM 2 (tracker=); SAM starts from the largest")
        out: dict[int, list[tuple[int, ...]]] = {}
        with self.writer.one_step():  # all objects are one undo step, as with SAM 2
            for label_id, plane in progress_bar(self._starts(axis, ids, settings), desc="propagating",
                                                unit="object", progress=progress):
                steps = self.propagate(plane, label_id, axis, settings, overwrite)
                out.setdefault(label_id, []).extend(s.plane for s in steps if s.mask is not None)
        return out

    def _starts(self, axis, ids, settings) -> list[tuple[int, tuple[int, ...]]]:
        """(id, plane) each SAM propagation starts from (``propagation_starts``); too small ones warned of."""
        min_area = (settings or PropagationSettings()).min_area
        starts, skipped = propagation_starts(self.labels, self.source.plane_axes, axis, ids, min_area)
        if skipped:
            warnings.warn(f"not propagated, smaller than min_area={min_area}: {'; '.join(skipped)}", stacklevel=3)
        return starts

    def propagate_all_steps(self, axis: str | None = None, ids=None, settings=None, overwrite: bool = False,
                            seeds: str = "largest") -> Iterator[MemoryStep | PropagationStep]:
        """:meth:`propagate_all` as a generator that a GUI drives and cancels by closing it (what was
        written stays, one undo step): with SAM 2 one :class:`~napari_sam.core.memory_propagation.
        MemoryStep` per plane and window, all objects together; with SAM each object's steps in turn."""
        if self.tracking is not None:
            return self.tracking.steps(self.writer, ids, axis, settings, overwrite, seeds)
        starts = self._starts(axis, ids, settings)
        steps = (s for i, p in starts for s in self.propagate(p, i, axis, settings, overwrite))
        return self.writer.as_one_step(steps)

    # -- every object ---------------------------------------------------------------------
    def segment_everything(self, plane=None, mode: str | None = None, *, whole_volume: bool = False,
                           commit: bool = True, overwrite: bool = False, progress: bool = True, rough=None,
                           link_iou: float = 0.3, **settings) -> np.ndarray:
        """Segment every object of a plane, or of a stack linked in 3D, and commit them.

        Parameters
        ----------
        plane
            Flat plane number or (t, z) tuple; None for a 2D image (or a 3D whole volume).
        mode
            One of :func:`~napari_sam.auto.modes.available_modes` (``"ais"``, ``"apg"`` with
            an instance decoder; ``"auto"``, ``"boxes"``), ``"labels"`` (each object of
            ``rough`` refined through SAM) or None for the one the model recommends.
        whole_volume
            Every plane along the innermost plane axis (Z, else T) through ``plane`` (for a
            TZYX image, the Z stack at its t), the objects linked plane to plane into 3D
            objects (:func:`~napari_sam.auto.link.link_planes`, IoU of at least ``link_iou``).
        commit, overwrite
            Write the objects into :attr:`labels` under new ids (a 3D object gets one id on
            every plane), as one undo step; objects already there keep their pixels unless
            ``overwrite``. ``commit=False`` only returns them.
        progress, rough
            Show a tqdm bar. ``mode="labels"``: an integer array of :attr:`labels_shape`.
        settings
            Of the mode (:mod:`napari_sam.auto.modes`): ``min_size`` (AIS), ``augment=True``
            (AIS from the maps of the plane seen enlarged and mirrored: better, about 30 times
            slower; :mod:`napari_sam.auto.augmentation`), ``points_per_side``...

        Returns
        -------
        numpy.ndarray
            (H, W), or (Z, H, W) with ``whole_volume``, uint32 (row, col): the pixels written
            under their ids in :attr:`labels`, or with ``commit=False`` all found, ids 1..n.

        Raises
        ------
        ValueError
            A missing plane, an unknown mode or setting, a decoder mode without a decoder.
        """
        from .core.progress_bar import progress_bar

        steps = self.segment_everything_steps(plane, mode, whole_volume=whole_volume, commit=commit,
                                              overwrite=overwrite, rough=rough, link_iou=link_iou, **settings)
        with progress_bar(desc="segmenting everything", progress=progress) as bar:
            while True:
                try:
                    report = next(steps)
                except StopIteration as stop:
                    return stop.value
                if whole_volume == (report.stage == "planes"):  # a volume counts planes, a plane its units
                    bar.unit, bar.total, bar.n = report.stage, report.total, report.done
                    bar.refresh()

    def segment_everything_steps(self, plane=None, mode: str | None = None, *, whole_volume: bool = False,
                                 commit: bool = True, overwrite: bool = False, rough=None, link_iou: float = 0.3,
                                 **settings) -> Generator[Progress, None, np.ndarray]:
        """:meth:`segment_everything` as a generator of :class:`~napari_sam.auto.Progress`
        (the mode's tiles or boxes, and one ``stage="planes"`` report per plane of a
        volume) returning the labels; closing it cancels (nothing is committed)."""
        planes = self._everything_planes(plane, whole_volume)
        if mode == "labels":
            rough = self._rough(rough)
        elif rough is not None:
            raise ValueError(f"rough labels are for mode 'labels', not {mode!r}")
        return self._everything(planes, mode, whole_volume, commit, overwrite, rough, link_iou, settings)

    def _everything(self, planes, mode, whole_volume, commit, overwrite, rough, link_iou, settings):
        from .auto.boxes import iter_refine_labels
        from .auto.modes import iter_segment_plane, iter_segment_volume

        if mode == "labels":
            found = yield from iter_refine_labels(self.embeddings, planes, rough, link_iou, **settings)
            found = found if whole_volume else found[0]
        elif whole_volume:
            found = yield from iter_segment_volume(self.embeddings, mode, planes, link_iou=link_iou, **settings)
        else:
            found = yield from iter_segment_plane(self.embeddings, planes[0], mode, **settings)
        found = np.asarray(found, np.uint32)
        stack = found.reshape(len(planes), *found.shape[-2:])
        return commit_instances(self.writer, planes, stack, overwrite).reshape(found.shape) if commit else found

    def _everything_planes(self, plane, whole_volume: bool) -> list[tuple[int, ...]]:
        if whole_volume:
            return self.source.stack_through(plane)
        if plane is None and self.source.n_planes > 1:
            raise ValueError(f"the image has {self.source.n_planes} planes ({self.source.plane_axes}): give "
                             "plane=, or whole_volume=True")
        return [self.plane(0 if plane is None else plane)]

    def _rough(self, rough):
        if rough is None:
            raise ValueError("mode 'labels' refines a rough segmentation: give rough= (a label array)")
        if tuple(rough.shape) != self.labels_shape:
            raise ValueError(f"the rough labels have shape {tuple(rough.shape)}, but the image's labels need "
                             f"{self.labels_shape}")
        return rough

    def erase(self, plane, ids) -> Commit | None:
        """Clear objects ``ids`` (an integer id or several; 0 is ignored) from one ``plane``
        (flat number or (t, z) tuple) as a commit that :meth:`undo` takes back, and return
        it; None when they have no pixel there. Other objects keep their pixels."""
        values = np.atleast_1d(np.asarray(ids))
        if values.dtype.kind not in "iu":
            raise ValueError(f"object ids are whole numbers, not {ids!r}")
        self.writer.check_no_step_open()
        return self.writer.erase(self.plane(plane), values)

    def undo(self) -> list[Commit]:
        """Undo the last commit (or the last propagation); returns what was undone."""
        return self.writer.undo()

    def __repr__(self) -> str:
        if self.model is None:  # a SAM 2 only: it propagates, and has no SAM embeddings
            model, cache = f"none (tracker {self.tracking.model.config.name})" if self.tracking else "none", None
        else:
            model, cache = getattr(self.model.source, "name", None) or "a SAM", self.embeddings.cache_path
        # nothing here reads the label image: its largest id could mean a scan of terabytes
        store = getattr(self.labels, "store_path", None)
        where = str(store) if store is not None else "in memory" if type(self.labels) is np.ndarray \
            else type(self.labels).__name__
        return (f"Annotator({self.source.describe()}; model {model}; labels {'x'.join(map(str, self.labels_shape))} "
                f"{self.labels.dtype} {where}; cache {cache or 'none (in memory)'})")
