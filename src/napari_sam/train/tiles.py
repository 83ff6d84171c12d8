"""Training planes cut the way inference cuts them.

The plugin, the command line and the evaluation never shrink a plane larger than the
model's input: they cut it into the tiles of :class:`~napari_sam.core.tiling.TileGrid`
(an interior plus a halo, exactly one model input at the default tiling) and embed each
at the plane's own resolution. A model fine-tuned on whole planes squeezed into its input
learns objects at another scale than it will be asked about (for the 256-pixel default
model a 520 x 696 DSB image shrinks 2.7 times, and fine-tuning it that way lost IoU on
held-out nuclei; docs/default_model.md). :func:`inference_tiles` turns a dataset of planes
into a dataset of those tiles, so that training sees what inference will.

An object cut by a tile's edge is kept when most of it lies inside (it is what the tile
answers for at inference: a click on its interior); a sliver of an object that belongs
to a neighbouring tile is removed from that tile's labels. Removing it cannot teach the
model that its pixels are background: each drawn object is supervised against its own
mask only.
"""

from __future__ import annotations

import numpy as np

from ..core.tiling import TileGrid, default_tiling
from .dataset import SegmentationDataset, object_ids

__all__ = ["inference_tiles"]


def _tile_labels(labels: np.ndarray, window: tuple[slice, slice], min_inside: float) -> np.ndarray:
    """The labels of one window, without objects that lie mostly outside it."""
    crop = labels[window]
    ids, inside = np.unique(crop, return_counts=True)
    keep = ids != 0
    ids, inside = ids[keep], inside[keep]
    if ids.size == 0:
        return crop.copy()
    all_ids, totals = np.unique(labels, return_counts=True)
    total = totals[np.searchsorted(all_ids, ids)]
    dropped = ids[inside < min_inside * total]
    out = crop.copy()
    if dropped.size:
        out[np.isin(out, dropped)] = 0
    return out


def inference_tiles(data: SegmentationDataset, image_size: int, min_inside: float = 0.5,
                    min_object_pixels: int = 1, magnification=1.0) -> SegmentationDataset:
    """The tiles inference would embed, of every plane of ``data``, as training pairs.

    A plane no larger than one model input stays whole (and is enlarged to the input when
    embedded, as at inference); a larger one becomes the embedded regions
    (:attr:`~napari_sam.core.tiling.Tile.outer`) of
    ``TileGrid(shape, *default_tiling(image_size, magnification))``, at its own resolution.

    Every plane is read here (the grid needs its shape), as training would read it anyway.

    Parameters
    ----------
    data
        Planes with their instance labels.
    image_size
        The model's input side (``model.config.image_size``).
    min_inside
        An object stays in a tile when at least this fraction of its pixels lies inside.
    min_object_pixels
        Tiles without an object of this many pixels are left out (nothing to learn).
    magnification
        The magnification inference embeds at (:mod:`napari_sam.core.scale`): a number,
        or a function of a plane (``(H, W[, C])``) that chooses it, as
        ``functools.partial(magnification_for, model)`` does.

    Returns
    -------
    SegmentationDataset
        One pair per kept tile, named ``"<plane> tile (row, col)"``; its description records
        the source and the tiling.

    Raises
    ------
    ValueError
        For an ``image_size`` or ``min_inside`` out of range, or when no tile holds an object.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    if not 0 < min_inside <= 1:
        raise ValueError(f"min_inside must lie in (0, 1], got {min_inside}")
    loaders, names, used = [], [], []
    for index in range(len(data)):
        pair = data[index]
        # (C, H, W) planes are accepted by the dataset; the labels give the plane's shape
        channels_first = (pair.image.ndim == 3 and pair.image.shape[1:] == pair.labels.shape
                          and pair.image.shape[:2] != pair.labels.shape)
        plane = np.moveaxis(pair.image, 0, -1) if channels_first else pair.image
        m = float(magnification(plane) if callable(magnification) else magnification)
        used.append(m)
        tile, halo = default_tiling(image_size, m)
        grid = TileGrid(pair.labels.shape, tile, halo)
        for t in grid:
            window = t.outer_slices
            labels = _tile_labels(pair.labels, window, min_inside)
            if object_ids(labels, min_object_pixels).size == 0:
                continue
            image = pair.image[(slice(None),) + window] if channels_first else pair.image[window]
            loaders.append(lambda p=(image, labels): p)
            names.append(pair.name if len(grid) == 1 else f"{pair.name} tile {t.index}")
    if not loaders:
        raise ValueError(f"no tile of the {len(data)} plane(s) holds an object of at least {min_object_pixels} pixels")
    description = dict(data.description, tiles={"image_size": int(image_size), "magnifications": sorted(set(used)),
                                                "min_inside": float(min_inside), "planes": len(data),
                                                "tiles": len(loaders)})
    return SegmentationDataset(loaders, names, description, data.channel_axis, data.channel)
