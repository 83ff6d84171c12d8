"""The instance decoder's maps of a whole plane, decoded tile by tile from cached
embeddings and stitched without seams.

Each tile of :attr:`Embeddings.grid <napari_sam.core.embeddings.Embeddings.grid>` was
embedded from its interior plus halo (``Tile.outer``). Its embedding is decoded to the
three maps (foreground, centre distances, boundary distances) at the tile's own
full-resolution size, with the tile's ``input_size`` and ``original_size``, exactly as
micro-sam's ``TiledInstanceSegmentationWithDecoder.initialize`` does: the decoder runs on
a batch of embeddings in the model input frame (:meth:`InstanceDecoder.maps
<napari_sam.model.instance_decoder.InstanceDecoder.maps>`) and each tile's maps are
brought to its region on their own (:meth:`InstanceDecoder.resize
<napari_sam.model.instance_decoder.InstanceDecoder.resize>`), because border tiles are
smaller. Only the interior of each tile's maps is kept: the interiors partition the
plane, so every pixel comes from exactly one tile, and from the tile that saw it with the
most context. The *maps* are stitched, not labels, so that the post-processing
(:func:`~napari_sam.auto.ais.instances_from_maps`) runs once on the whole plane and an
object crossing a tile border is one object wherever the maps say so.

Coordinates: maps are (channel, row, col) arrays in plane pixels.
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
import torch

from ..core.image_embedding import ImageEmbedding
from ..core.tiling import Tile
from .results import Progress

__all__ = ["default_batch_size", "iter_instance_maps", "tile_instance_maps"]


def _device(decoder) -> torch.device:
    """Where the decoder's weights are (the CPU for a module without parameters)."""
    try:
        return next(decoder.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _check_decoder(decoder) -> None:
    if getattr(decoder, "training", False):
        # Batch norm in training mode would normalise by each batch and update its
        # running statistics: the maps would change the decoder.
        raise ValueError("the instance decoder is in training mode; call decoder.eval() before segmenting")


@torch.inference_mode()
def tile_instance_maps(
    decoder, embeddings: list[ImageEmbedding], image_size: int, images: list[torch.Tensor] | None = None,
    windows: list[tuple[slice, slice]] | None = None,
) -> list[np.ndarray]:
    """Decode a batch of tile embeddings to maps at each tile's full resolution.

    Parameters
    ----------
    decoder
        An :class:`~napari_sam.model.instance_decoder.InstanceDecoder` in eval mode (any
        object with its ``maps`` and ``resize`` methods).
    embeddings
        Tile embeddings of one model (features (1, 256, S, S)), with the ``input_size`` and
        ``original_size`` of the region each was computed from.
    image_size
        Side of the square model input (``model.config.image_size``).
    images
        For a decoder that refines its maps by the image (``decoder.needs_image``): each
        tile's (1, 3, S, S) model input (:meth:`Embeddings.model_input
        <napari_sam.core.embeddings.Embeddings.model_input>`), in the order of ``embeddings``.
    windows
        With ``images``: the (rows, cols) slices of each tile's maps that will be kept (its
        interior, ``Tile.inner_in_outer``); the refiner then works there only
        (:meth:`ImageRefiner.forward <napari_sam.model.image_refiner.ImageRefiner.forward>`).

    Returns
    -------
    list of numpy.ndarray
        One (3, rows, cols) float32 array per embedding, (rows, cols) its
        ``original_size``: foreground, centre distances, boundary distances in [0, 1].
    """
    _check_decoder(decoder)
    if not embeddings:
        return []
    device = _device(decoder)
    out = []
    # No autograd graph: it would keep every layer's output alive and cost time.
    with torch.inference_mode():
        if images is None:
            batch = decoder.maps(torch.cat([e.features for e in embeddings]).to(device))
            maps = [batch[k : k + 1] for k in range(len(embeddings))]
        else:  # one by one: each tile refines its own window (and batches gain nothing on a CPU)
            windows = windows if windows is not None else [None] * len(embeddings)
            maps = [decoder.maps(e.features.to(device), image.to(device), _input_window(e, w))
                    for e, image, w in zip(embeddings, images, windows)]
        for k, emb in enumerate(embeddings):
            tile = decoder.resize(maps[k], emb.input_size, emb.original_size, image_size)[0]
            out.append(tile.float().cpu().numpy())
    return out


def _input_window(emb: ImageEmbedding, window: tuple[slice, slice] | None) -> tuple[int, int, int, int] | None:
    """A window of a tile's original pixels in its model input's pixels (outward-rounded)."""
    if window is None:
        return None
    (rows, cols), (h, w) = emb.input_size, emb.original_size
    r, c = window
    return (int(r.start * rows // h), -(-r.stop * rows // h), int(c.start * cols // w), -(-c.stop * cols // w))


def _needs_image(decoder) -> bool:
    return bool(getattr(decoder, "needs_image", False))


def default_batch_size(decoder, image_size: int, budget: int = 256 * 2**20) -> int:
    """Tiles decoded at once so that the decoder's largest features stay near ``budget``
    bytes: 1 for micro-sam's decoders on 1024-pixel inputs (about 2 GB of features per
    tile), dozens for the default model's small, coarse one."""
    config = getattr(decoder, "config", None)
    if config is None:
        return 1
    side = image_size * getattr(config, "scale", 16) / 16
    per_tile = 2 * config.initial_features * 4 * side * side * 4  # a few maps alive at once, float32
    return int(max(1, min(64, budget // per_tile)))


def _place(out: np.ndarray, tile: Tile, maps: np.ndarray) -> None:
    y0, y1, x0, x1 = tile.inner
    out[:, y0:y1, x0:x1] = maps[(slice(None), *tile.inner_in_outer)]


def iter_instance_maps(
    embeddings, plane, decoder, batch_size: int | None = None
) -> Generator[Progress, None, np.ndarray]:
    """The decoder's maps of one plane, tile by tile.

    Parameters
    ----------
    embeddings
        The image's :class:`~napari_sam.core.embeddings.Embeddings` (read: ``grid``,
        ``source.flat_index``, ``embedding_for``, ``model.config.image_size``); tiles not
        yet embedded are embedded on the way.
    plane
        Flat plane number or (t, z) tuple.
    decoder
        An :class:`~napari_sam.model.instance_decoder.InstanceDecoder` in eval mode, made
        for the embeddings' image encoder (its ``embed_dim`` is checked, nothing else can be).
    batch_size
        Tiles decoded at once (memory grows with it: each tile's decoder features are
        about ``64 * 4 * image_size ** 2`` bytes at the released checkpoints' width); by
        default :func:`default_batch_size`.

    Yields
    ------
    Progress
        After each tile (``stage="tiles"``); closing the generator cancels the rest.

    Returns
    -------
    numpy.ndarray
        Through ``StopIteration.value``: (3, H, W) float32 maps of the plane (12 bytes per
        pixel; the whole plane is held in memory).
    """
    _check_decoder(decoder)
    image_size = int(embeddings.model.config.image_size)
    batch_size = default_batch_size(decoder, image_size) if batch_size is None else batch_size
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    flat = embeddings.source.flat_index(plane)
    grid = embeddings.grid
    out = np.empty((3, *grid.shape), np.float32)
    tiles = list(grid)
    done = 0
    for start in range(0, len(tiles), int(batch_size)):
        chunk = tiles[start : start + int(batch_size)]
        batch = [embeddings.embedding_for(flat, tile.index) for tile in chunk]
        # A decoder that refines its maps by the image reads each tile's pixels again,
        # prepared exactly as for its embedding (they are not kept in the cache).
        images = [embeddings.model_input(flat, tile.index) for tile in chunk] if _needs_image(decoder) else None
        windows = [tile.inner_in_outer for tile in chunk]
        for tile, maps in zip(chunk, tile_instance_maps(decoder, batch, image_size, images, windows)):
            _place(out, tile, maps)
            done += 1
            yield Progress(done, len(tiles), flat, tile.index, "tiles")
    return out
