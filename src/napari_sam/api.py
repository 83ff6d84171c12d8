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
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .core.embeddings import Embeddings, EmbedProgress
from .core.image_source import ImageSource
from .core.labels import Commit, LabelWriter, create_label_store
from .core.masks import PlaneMask
from .core.models import resolve_model
from .core.ngff import LabelImage
from .core.preprocess import Normalization
from .core.prompts import Prompt
from .core.propagation import PropagationSettings, PropagationStep, propagate

__all__ = ["Annotator"]

# Label images up to this size are kept in memory; larger ones go to a Zarr array on disk.
IN_MEMORY_LABELS = 1 << 30


class Annotator:
    """Segment objects of an image into a label image from point and box prompts.

    Parameters
    ----------
    image
        An :class:`~napari_sam.core.image_source.ImageSource`, or an array with ``axes``
        and ``channel`` (see there).
    model
        A loaded SAM, a registry name, a checkpoint file, or None for ``$NAPARI_SAM_MODEL``,
        else the default model shipped with the package
        (:func:`~napari_sam.core.models.resolve_model`).
    labels
        Where objects go: an integer array whose shape is the image's planes and plane
        (e.g. (Z, Y, X) for a ZYX or ZYXC image), a path for a Zarr label array on disk
        (created, or reopened to continue), a :class:`~napari_sam.core.ngff.LabelImage`
        (an OME-Zarr label image, whose lower resolution levels follow every commit and
        undo; see :func:`~napari_sam.core.ngff.open_label_image`), or None for a new array
        (in memory up to 1 GiB, else an error asking for a path).
    cache, tile, halo, normalization
        See :class:`~napari_sam.core.embeddings.Embeddings`.
    device, dtype
        See :func:`~napari_sam.core.models.load_model` (used when ``model`` is not loaded).
    """

    def __init__(
        self,
        image,
        model=None,
        labels=None,
        *,
        axes: str | None = None,
        channel: int | None = None,
        cache: str | os.PathLike | None | bool = None,
        tile: int | None = None,
        halo: int | None = None,
        normalization: Normalization = Normalization(),
        device: str | None = None,
        dtype: str = "auto",
    ):
        self.source = image if isinstance(image, ImageSource) else ImageSource(image, axes, channel)
        self.model = resolve_model(model, device, dtype)
        self.embeddings = Embeddings(self.source, self.model, cache, tile=tile, halo=halo, normalization=normalization)
        # an OME-Zarr label image: its lower levels follow every change of level 0
        self.label_image = labels if isinstance(labels, LabelImage) else None
        on_write = labels.update if isinstance(labels, LabelImage) else None
        self.writer = LabelWriter(self._labels(labels), on_write=on_write)

    def _labels(self, labels):
        shape = self.labels_shape
        if labels is None:
            size = int(np.prod(shape)) * 4
            if size > IN_MEMORY_LABELS:
                raise ValueError(
                    f"labels of shape {shape} take {size / 2**30:.1f} GiB: give labels= a path for a Zarr array on disk"
                )
            return np.zeros(shape, np.uint32)
        if isinstance(labels, (str, Path)):
            return create_label_store(labels, shape)
        if isinstance(labels, LabelImage):
            if tuple(labels.data.shape) != shape:
                raise ValueError(f"the label image {labels.path} has shape {tuple(labels.data.shape)} "
                                 f"({labels.axes}), but the image needs {shape} (planes, then Y, X)")
            return labels.data
        if tuple(labels.shape) != shape:
            raise ValueError(
                f"labels have shape {tuple(labels.shape)}, but the image needs {shape} (planes, then Y, X)"
            )
        return labels

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
        """One object on a plane; missing tiles are embedded first.

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
        return self.embeddings.segment(plane, prompt, multimask)

    # -- results -------------------------------------------------------------------------
    def commit(self, plane, masks, overwrite: bool = False) -> Commit:
        """Write objects into one plane of :attr:`labels` under new ids (next free ones).
        Pixels of other objects are kept unless ``overwrite``."""
        return self.writer.commit(self.plane(plane), list(masks), overwrite=overwrite)

    def object_mask(self, plane, label_id: int) -> PlaneMask:
        """The committed object ``label_id`` on a plane, as a PlaneMask."""
        mask = PlaneMask.from_full(np.asarray(self.labels[self.plane(plane)]) == label_id)
        if not mask.area:
            raise ValueError(f"object {label_id} is not on plane {self.plane(plane)}")
        return mask

    def propagate(self, plane, label_id: int, axis: str | None = None,
                  settings: PropagationSettings = PropagationSettings(),
                  overwrite: bool = False) -> Iterator[PropagationStep]:
        """Follow committed object ``label_id`` from ``plane`` through the neighbouring planes
        (both directions along ``axis``, Z by default, or T), writing each plane's mask
        under the same id as soon as it is known; a generator of progress.

        Stopping the iteration leaves every plane written so far in place; the whole
        propagation is one undo step. Other objects are kept unless ``overwrite``.
        """
        start = self.object_mask(plane, label_id)
        written = 0
        try:
            for step in propagate(self.embeddings, plane, start, axis, settings):
                if step.mask is not None:
                    self.writer.commit(step.plane, [step.mask], overwrite=overwrite, ids=[label_id])
                    written += 1
                yield step
        finally:
            self.writer.group(written)

    def propagate_all(self, axis: str | None = None, ids=None, settings: PropagationSettings = PropagationSettings(),
                      overwrite: bool = False, progress: bool = True) -> dict[int, list[tuple[int, ...]]]:
        """Propagate every object (or those in ``ids``) from the plane where it is largest.

        Returns, per id, the planes it was written on.
        """
        from tqdm.auto import tqdm

        seeds = _largest_planes(self.labels, len(self.source.plane_grid), ids)
        out = {}
        for label_id, plane in tqdm(seeds.items(), desc="propagating", unit="object", disable=not progress):
            out[label_id] = [
                s.plane for s in self.propagate(plane, label_id, axis, settings, overwrite) if s.mask is not None
            ]
        return out

    def undo(self) -> list[Commit]:
        """Undo the last commit (or the last propagation); returns what was undone."""
        return self.writer.undo()


def _largest_planes(labels, n_plane_axes: int, ids=None) -> dict[int, tuple[int, ...]]:
    """For each object id, the plane (index over the leading axes) where it has the most
    pixels; read plane by plane, so a Zarr label volume is never loaded whole."""
    best: dict[int, tuple[int, tuple[int, ...]]] = {}
    for plane in np.ndindex(*labels.shape[:n_plane_axes]):
        values, counts = np.unique(np.asarray(labels[plane]), return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            if v and (ids is None or v in ids) and c > best.get(v, (0, ()))[0]:
                best[v] = (c, tuple(int(i) for i in plane))
    return {v: plane for v, (_, plane) in sorted(best.items())}
