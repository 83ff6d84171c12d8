"""Test-time augmentation of the instance decoder's maps: the plane seen enlarged and
mirrored, each view's maps brought back to the plane and averaged.

The instance decoder reads a coarse embedding (16 pixels per token at magnification 1
for the default model), so small touching objects often share a seed. Seen enlarged,
the same objects span more tokens; seen mirrored, the decoder's errors that do not
follow the image (its checkerboard, its tile borders) land elsewhere. Averaging the
views' foreground and distance maps before the one post-processing
(:func:`~napari_sam.auto.ais.instances_from_maps`) keeps what they agree on. This is
the augmentation cellpose offers (``augment``), applied to micro-sam's maps.

Measured on the default model's held-out DSB fluorescence nuclei (docs/automatic.md):
AIS mSA 0.442 -> 0.491 with :data:`DEFAULT` (scales and flips chosen on training images),
at about 29 times the embedding work of one view: an option for the planes that matter,
not the default.

Coordinates: every view's maps are returned to the plane's (row, col) pixels before
averaging, so the result is (3, H, W) like :func:`~napari_sam.auto.instance_maps.iter_instance_maps`.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import numpy as np

from ..core.preprocess import Normalization
from ..core.tiling import TileGrid, default_tiling
from .instance_maps import iter_instance_maps
from .results import Progress

__all__ = ["DEFAULT", "Augmentation", "iter_augmented_maps"]

_FLIPS: tuple[tuple[int, ...], ...] = ((), (0,), (1,), (0, 1))  # none, rows, columns, both


@dataclass(frozen=True)
class Augmentation:
    """Which views of a plane the instance decoder reads.

    Parameters
    ----------
    scales
        Magnifications relative to the embeddings the decoder reads otherwise (1 = those
        embeddings themselves; see :func:`iter_augmented_maps` for what is cached).
    flips
        Also read each scale mirrored along rows, columns and both (4 views per scale);
        mirrored views are embedded in memory on each call, never cached.
    """

    scales: tuple[float, ...] = (1.0, 1.5, 2.0)
    flips: bool = True

    def __post_init__(self):
        if not self.scales or any(not (0 < float(s) <= 8) for s in self.scales):
            raise ValueError(f"augmentation scales must be in (0, 8], got {self.scales}")

    def views(self) -> list[tuple[float, tuple[int, ...]]]:
        """(scale, mirrored axes of the (row, col) plane) of every view, in the order read."""
        return [(float(s), f) for s in self.scales for f in (_FLIPS if self.flips else ((),))]


DEFAULT = Augmentation()
"""Scales 1, 1.5 and 2, each mirrored four ways (12 views): chosen among the scale sets
and mirrorings tried on six DSB training images with the default model (mSA 0.491 ->
0.548 there; one set with a fourth scale scored 0.001 more for a fifth more work;
``scripts/tune_ais.py --augment`` prints the comparison, docs/automatic.md has it)."""


def _in_memory(embeddings, plane, pixels: np.ndarray, axes: tuple[int, ...], magnification: float):
    """In-memory embeddings of the plane mirrored along ``axes`` (none: as it is),
    normalised exactly as the plane itself (its own limits), at ``magnification``."""
    from ..core.embeddings import Embeddings

    limits = embeddings.limits_for(plane)
    norm = embeddings.normalization if limits is None else Normalization(mode="fixed", limits=tuple(limits))
    view = np.ascontiguousarray(np.flip(pixels, axes) if axes else pixels)
    # RGB pixels here mean the plane is read in colour: the view must not take the stain advice anew
    return Embeddings(view, embeddings.model, cache=False, axes="YX" if view.ndim == 2 else "YXC",
                      channel="rgb" if view.ndim == 3 else None, normalization=norm, statistics="plane",
                      magnification=magnification)


def iter_augmented_maps(
    embeddings, plane, decoder, augmentation: Augmentation = DEFAULT, batch_size: int | None = None
) -> Generator[Progress, None, np.ndarray]:
    """The instance decoder's maps of one plane, averaged over the views of ``augmentation``.

    Parameters
    ----------
    embeddings
        The :class:`~napari_sam.core.embeddings.Embeddings` the decoder reads without
        augmentation; scales are relative to their magnification.
    plane
        Flat plane number or (t, z) tuple.
    decoder
        The model's instance decoder, in eval mode.
    augmentation
        The views (:class:`Augmentation`).
    batch_size
        Tiles decoded at once (:func:`~napari_sam.auto.instance_maps.iter_instance_maps`).

    Yields
    ------
    Progress
        After each tile of each view (``stage="tiles"``, ``total`` over all views);
        closing the generator cancels the rest.

    Returns
    -------
    numpy.ndarray
        Through ``StopIteration.value``: (3, H, W) float32 mean maps of the plane in its
        (row, col) pixels: foreground, centre distances, boundary distances.

    Notes
    -----
    One view is held at a time. Unmirrored views at another scale are the cached
    siblings of ``embeddings`` (:meth:`Embeddings.at_magnification
    <napari_sam.core.embeddings.Embeddings.at_magnification>`) when they have a cache on
    disk; without one, like mirrored views, they are embedded in memory for this plane
    and dropped after, so that a long volume does not collect them.
    """
    flat = embeddings.source.flat_index(plane)
    size = int(embeddings.model.config.image_size)
    cached = embeddings.cache_path is not None
    views = [(embeddings.magnification * scale, axes) for scale, axes in augmentation.views()]

    def own(magnification, axes) -> bool:  # read from `embeddings` or its cached sibling
        return not axes and (cached or magnification == embeddings.magnification)

    total = sum(len(embeddings.grid) if own(m, a) and m == embeddings.magnification
                else len(TileGrid(embeddings.grid.shape, *default_tiling(size, m))) for m, a in views)
    mean = np.zeros((3, *embeddings.grid.shape), np.float32)
    pixels = None
    done = 0
    for magnification, axes in views:
        if own(magnification, axes):
            view, view_plane = embeddings.at_magnification(magnification), flat
        else:
            pixels = embeddings.source.read(flat) if pixels is None else pixels
            view, view_plane = _in_memory(embeddings, flat, pixels, axes, magnification), 0
        steps = iter_instance_maps(view, view_plane, decoder, batch_size)
        try:
            while True:
                try:
                    report = next(steps)
                except StopIteration as stop:
                    maps = stop.value
                    break
                done += 1
                yield Progress(done, total, flat, report.tile, "tiles")
        finally:
            steps.close()
        # Mirror back: map axes are (channel, row, col), the plane's (row, col) shifted by one.
        mean += np.flip(maps, tuple(a + 1 for a in axes)) if axes else maps
        del view, maps
    mean /= len(views)
    return mean
