"""SAM embeddings of every plane of an image: computed on demand or ahead, tile by tile,
cached in Zarr, in parallel or on a ``dask.distributed`` cluster.

:class:`Embeddings` ties an :class:`~napari_sam.core.image_source.ImageSource`, a model
and an :class:`~napari_sam.core.embedding_store.EmbeddingStore` together:

* :meth:`Embeddings.embedding_for` returns one tile's embedding, from the cache or
  computed now (the viewer embeds the plane the user looks at first);
* :meth:`Embeddings.precompute` computes whatever is missing, one task per tile, and
  yields progress; stop iterating to cancel, run it again to resume;
* :meth:`Embeddings.segment` answers prompts on a plane across its tiles.

Memory stays bounded by a few tiles whatever the image size: a task reads only its
tile's region (plus halo) and writes its result straight into the cache.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..model.sam import Sam
from .cache_fallback import open_for_session, write_kept
from .cache_location import cache_path_for, default_cache_path
from .claims import CLAIM_TIMEOUT
from .distributed import embed_region
from .image_embedding import ImageEmbedding
from .image_source import ImageSource
from .masks import PlaneMask
from .models import model_identity
from .pixel_heads import chooses_masks, reads_pixels, refines_masks
from .precompute import EmbedProgress, compute_all, iter_precompute
from .predictor import Prediction, Predictor
from .preprocess import IntensityLimits, Normalization
from .prompts import Prompt
from .scale import ObjectDiameters, central_crop, magnification_for
from .signature import CacheSignature, as_stored, fingerprint
from .stain import channel_for
from .tiled_segmentation import LazyMasks, segment_tiled
from .tiling import Tile, TileGrid, default_tiling

__all__ = ["EmbedProgress", "Embeddings", "default_cache_path"]

_RECENT = 16  # embeddings kept in memory (4 MiB each): a few planes' worth of tiles


class Embeddings:
    """The embeddings of an image's planes and tiles.

    Parameters
    ----------
    image
        An :class:`ImageSource`, an array (numpy, dask, zarr) described by ``axes`` and
        ``channel``, or an image file's path (:meth:`ImageSource.of`).
    model
        A loaded SAM (:func:`~napari_sam.core.models.load_model`).
    cache
        Cache directory (a ``.zarr`` folder, created if missing); None for the default
        (:func:`default_cache_path`); False to keep embeddings in memory only.
    axes, channel
        See :class:`ImageSource` (when ``image`` is an array). An RGB image read without a
        channel follows the model's stain advice (:func:`~napari_sam.core.stain.channel_for`).
    tile, halo
        Tile interior side and halo in pixels; a plane no larger than ``tile + 2 * halo``
        is embedded whole. By default they follow from the magnification
        (:func:`~napari_sam.core.tiling.default_tiling`): at 1, the embedded region of a
        tile is exactly the model's input (768 + 2 x 128 for SAM's 1024 pixels).
    magnification
        How many times the model sees the plane enlarged (:mod:`napari_sam.core.scale`):
        a number, ``"auto"`` (chosen from the objects' diameter for a model that records
        the diameter it wants), or None for the model's advice (1 for models without).
        Given ``tile`` and ``halo``, it follows from them. The choice is
        :attr:`magnification`, :attr:`magnification_advised` when the model's (not given).
    diameter
        The objects' diameter in plane pixels, if known, for a model that records the
        size it wants; otherwise it is estimated from the middle plane when the
        magnification is chosen from it. Kept in :attr:`diameters` (each plane's,
        estimated once), which AIS also reads on stained planes.
    normalization
        Intensity mapping. Percentiles are taken from a sample of chunks of the whole
        image (``statistics="volume"``, so all planes and tiles agree) or of each plane
        (``"plane"``), never of a single tile.
    statistics
        ``"volume"`` or ``"plane"``.
    storage
        ``"float32"`` (exact) or ``"float16"`` (half the disk).
    on_mismatch
        When the cache holds embeddings computed differently: ``"keep"`` them and compute
        new ones beside them (with a warning saying what differs; ``"beside"``: without
        one), ``"error"``, or ``"replace"`` them.

    Examples
    --------
    >>> emb = Embeddings(volume, load_model("vit_b_lm"), axes="ZYX")      # doctest: +SKIP
    >>> for p in emb.precompute(): print(p.done, "/", p.total)            # doctest: +SKIP
    >>> obj = emb.segment(12, Prompt.make(points=[[300, 410]]))             # doctest: +SKIP
    >>> labels[12][obj.slices][obj.mask] = 7                                # doctest: +SKIP
    """

    def __init__(
        self,
        image,
        model: Sam,
        cache: str | os.PathLike | None | bool = None,
        *,
        axes: str | None = None,
        channel: int | str | None = None,
        tile: int | None = None,
        halo: int | None = None,
        normalization: Normalization = Normalization(),
        statistics: str = "volume",
        storage: str = "float32",
        on_mismatch: str = "keep",
        magnification: float | str | None = None,
        diameter: float | None = None,
    ):
        source = ImageSource.of(image, axes, channel)
        advised = source.rgb and normalization.mode != "fixed"  # fixed limits are in the colours' units
        self.source = source.with_channel(channel_for(model, source.channel, advised, lambda: central_crop(source)))
        self.model = model
        size = model.config.image_size
        self.magnification_advised = tile is None and halo is None and magnification in (None, "auto")
        self.diameters = ObjectDiameters(self.source, diameter)
        if tile is None or halo is None:
            diameter_of = self.diameters.given or self.diameters.of  # a function: estimated only if wanted
            self.magnification = magnification_for(model, None, magnification, diameter_of)
        else:
            self.magnification = size / (tile + 2 * halo)
        auto_tile, auto_halo = default_tiling(size, self.magnification)
        tile = auto_tile if tile is None else tile
        halo = auto_halo if halo is None else halo
        self.grid = TileGrid(self.source.plane_shape, tile, halo)
        self.feature_shape = (model.config.prompt_embed_dim, model.config.embedding_size, model.config.embedding_size)
        self.normalization = normalization
        self.statistics = statistics
        self._options: dict[str, Any] = dict(cache=cache, normalization=normalization, statistics=statistics,
                                             storage=storage, on_mismatch=on_mismatch)
        self._intensity = IntensityLimits(self.source, normalization, statistics)
        self.limits = self._intensity.volume
        name, checksum, dtype = model_identity(model)
        norm = dataclasses.asdict(normalization) | {"statistics": statistics, "resolved_limits": self.limits}
        image_fp = fingerprint(self.source.array)
        self.signature = CacheSignature(
            model=name,
            checkpoint=checksum,
            dtype=dtype,
            normalization=as_stored(norm),
            tile=tile,
            halo=halo,
            shape=self.source.shape,
            dtype_in=str(self.source.dtype),
            axes=self.source.axes,
            image_fingerprint=image_fp,
            channel=self.source.channel,
            storage=storage,
        )
        self.cache_path = cache_path_for(cache, self.source, image_fp)
        rows, cols = self.grid.grid_shape
        self.store = open_for_session(self.cache_path, self.signature, (self.source.n_planes, rows, cols),
                                      on_mismatch, self.feature_shape)
        self._encoder = Predictor(model, normalization, traced=False)  # embeds only
        self._decoder = Predictor(model, normalization)
        self._recent: OrderedDict[tuple[int, int, int], ImageEmbedding] = OrderedDict()
        self._lock = threading.Lock()  # guards _recent and the per-entry locks
        self._entry_locks: dict[tuple[int, int, int], threading.Lock] = {}
        self._decode_lock = threading.Lock()
        self._pixels: OrderedDict[tuple[int, tuple[int, int]], torch.Tensor] = OrderedDict()
        self._ready: set[int] = set()  # planes seen complete in the cache

    def at_magnification(self, magnification: float) -> "Embeddings":
        """The same image, model, cache and settings embedded at another magnification
        (``self`` at this one's); kept, so made once; cached beside this one's entries."""
        if magnification == self.magnification:
            return self
        siblings = self.__dict__.setdefault("_siblings", {})
        if magnification not in siblings:
            options = {**self._options, "on_mismatch": "beside"}
            siblings[magnification] = Embeddings(self.source, self.model, magnification=magnification, **options)
            siblings[magnification].diameters = self.diameters  # one estimate per plane, or the user's, for all
        return siblings[magnification]

    # -- entries -----------------------------------------------------------------------
    def entries(self, planes=None) -> list[tuple[int, int, int]]:
        """(plane, row, col) of every tile of the given planes (default: all)."""
        flat = range(self.source.n_planes) if planes is None else [self.source.flat_index(p) for p in planes]
        return [(p, t.index[0], t.index[1]) for p in flat for t in self.grid]

    def limits_for(self, plane) -> tuple[float, float] | None:
        """The intensity limits used for a plane."""
        return self._intensity.for_plane(plane)

    def is_cached(self, plane, tile: tuple[int, int] = (0, 0)) -> bool:
        """Whether a tile's embedding is in the cache (without reading it)."""
        flat = self.source.flat_index(plane)
        return flat in self._ready or (flat, *tile) in self._recent or self.entry_stored((flat, tile[0], tile[1]))

    def plane_ready(self, plane) -> bool:
        """Whether every tile of a plane is cached."""
        flat = self.source.flat_index(plane)
        # The widget asks on every click, from the GUI thread, and a cache read waits on
        # zarr's event loop (~15 ms here): a plane once complete is remembered. Only
        # positives are, since another process may be filling the same cache.
        if flat not in self._ready and self.store.plane_stored(flat):
            self._ready.add(flat)
        return flat in self._ready

    def embedding_for(self, plane, tile: tuple[int, int] = (0, 0)) -> ImageEmbedding:
        """One tile's embedding: from memory, from the cache, or computed and cached now.

        Parameters
        ----------
        plane
            Flat plane number or (t, z) tuple.
        tile
            (row, col) in :attr:`grid`; (0, 0) is the whole plane when it is one tile.
        """
        entry = (self.source.flat_index(plane), *self.grid[tile].index)
        with self._lock:
            if entry in self._recent:
                self._recent.move_to_end(entry)
                self.store.note_use()  # answered from memory, the cache still serves this session
                return self._recent[entry]
            lock = self._entry_locks.setdefault(entry, threading.Lock())
        with lock:  # two threads asking for the same tile compute it once
            with self._lock:
                if entry in self._recent:
                    return self._recent[entry]
            features = self.store.read(entry)
            if features is None:
                features = self._compute(entry)
            emb = ImageEmbedding.from_array(features, self.grid[entry[1:]].shape, self.model.config.image_size)
            with self._lock:
                self._recent[entry] = emb
                while len(self._recent) > _RECENT:
                    self._recent.popitem(last=False)
                self._entry_locks.pop(entry, None)
        return emb

    def model_input(self, plane, tile: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """(1, 3, S, S) float32: a tile's pixels as its embedding read them (:meth:`Predictor.model_input`)."""
        region = self.source.read(flat := self.source.flat_index(plane), self.grid[tile].outer)
        return self._encoder.model_input(region, self.limits_for(flat))

    def _enlarged(self, tile: tuple[int, int]) -> float:
        """How many times a tile is enlarged for its embedding (a tile smaller than the
        input is enlarged to fill it)."""
        y0, y1, x0, x1 = self.grid[tile].outer
        return max(self.magnification, self.model.config.image_size / max(y1 - y0, x1 - x0))

    def _refiner_pixels(self, plane, tile: tuple[int, int]) -> torch.Tensor | None:
        """A tile's model input for a model whose mask refiner or chooser reads it (the
        cache holds embeddings only; the few tiles a click visits are kept)."""
        if not reads_pixels(self.model, self.source.channel, self._enlarged(tile)):
            return None
        with self._lock:
            pixels = self._pixels.pop((plane, tile), None)
        pixels = self.model_input(plane, tile) if pixels is None else pixels
        with self._lock:
            self._pixels[(plane, tile)] = pixels  # the newest last; the oldest go first
            while len(self._pixels) > 8:
                self._pixels.popitem(last=False)
        return pixels

    def _compute(self, entry: tuple[int, int, int]) -> np.ndarray:
        tile = self.grid[entry[1:]]
        region = self.source.read(entry[0], tile.outer)
        features = embed_region(self._encoder, region, self.limits_for(entry[0]))
        with self._lock:  # one store for every thread: a refused cache gives way to one in memory once
            self.store = write_kept(self.store, entry, features)
        # Hand out what a later read of the cache gives (float16 storage rounds).
        return features.astype(self.signature.storage).astype(np.float32)

    # -- computing ahead ---------------------------------------------------------------
    def precompute(self, planes=None, scheduler=None, verify: bool = True,
                   claim_timeout: float = CLAIM_TIMEOUT) -> Iterator[EmbedProgress]:
        """Compute every missing tile of the given planes; yields progress.

        Parameters
        ----------
        planes
            Plane numbers or (t, z) tuples; all planes by default.
        scheduler
            None: here, one tile after another (torch uses the cores). ``"local:N"``: a
            ``dask.distributed`` LocalCluster of N worker processes. An address
            (``"tcp://host:8786"``) or a ``distributed.Client``: that cluster. Workers load
            the model once each (from its checkpoint file) and write into the cache
            themselves, so the cache must be a folder every worker can reach.
        verify
            Also check the checksums of entries already present (catches damaged files).
        claim_timeout
            Seconds after which another writer's claim on a tile is abandoned even if its
            process cannot be checked (:mod:`~napari_sam.core.claims`): writers of one
            cache share the tiles, each computing those it claims, then waiting for the rest.

        Yields
        ------
        EmbedProgress
            First the entries already present, then one report per finished tile.
            Closing the generator (``break`` out of the loop) cancels the rest; what was
            finished stays cached, and a later call resumes from there.
        """
        return iter_precompute(self, planes, scheduler, verify, claim_timeout)

    def entry_stored(self, entry: tuple[int, int, int]) -> bool:
        """Whether an entry (flat plane, tile row, tile column) is in the cache (its checksum is set)."""
        return self.store.stored(entry)

    def compute_all(self, planes=None, scheduler=None, progress: bool = True) -> int:
        """:meth:`precompute` to the end with a tqdm progress bar; returns the number of
        tiles present afterwards."""
        return compute_all(self, planes, scheduler, progress)

    # -- prompts -----------------------------------------------------------------------
    def segment(self, plane, prompt: Prompt, multimask: bool | None = None, max_tiles: int = 16,
                refine: bool = True) -> PlaneMask:
        """Segment one object on a plane from its prompt in plane pixels.

        Parameters
        ----------
        plane
            Flat plane number or (t, z) tuple.
        prompt
            Points (x, y) = (column, row), labels, box and the earlier answer it corrects.
        multimask, max_tiles
            See :func:`~napari_sam.core.tiled_segmentation.segment_tiled`.
        refine
            Let the model's pixel heads act on a first answer: its mask refiner sharpen it and,
            for a lone click, its mask chooser rank the three masks (``False``: SAM's own
            masks, ranked by its IoU head).

        Returns
        -------
        PlaneMask
            The object's mask as a crop of the plane (missing tiles are embedded first),
            with the magnification that answered: a correction of an answer made at
            another magnification is answered there (:meth:`at_magnification`).
        """
        made_at = prompt.previous.magnification if prompt.previous is not None else None
        if made_at not in (None, self.magnification):  # a correction is answered where its logits were made
            return self.at_magnification(made_at).segment(plane, prompt, multimask, max_tiles, refine)
        flat = self.source.flat_index(plane)

        asked: list[tuple[int, int]] = []

        def answer(tile: Tile, pts, lbl, bx, multi, mask_input=None):
            # the chooser ranks the click's own answer only: a tile the object runs on into
            # is asked with a hint point and must agree with the mask it continues
            choose = refine and not asked and prompt.previous is None
            asked.append(tile.index)
            result = self.decode_tile(flat, tile.index, pts, lbl, bx, mask_input, multi, refine, choose)
            return LazyMasks(result), result.iou

        return dataclasses.replace(segment_tiled(self.grid, answer, prompt, multimask, max_tiles),
                                   magnification=self.magnification)

    def warm_up(self) -> None:
        """Prepare the decoder's traced graphs (:meth:`Predictor.warm_up`) so that the
        first click is as fast as the later ones; GUIs call this while loading."""
        with self._decode_lock:
            self._decoder.warm_up()

    def decode_tile(self, plane, tile: tuple[int, int], points, labels, box, mask_input, multimask: bool,
                    refine: bool = True, choose: bool = False) -> Prediction:
        """Answer prompts on one tile (:meth:`Predictor.predict`): points (N, 2) as (x, y)
        and box (4,) as (x0, y0, x1, y1) in the pixels of the tile's embedded region
        (``grid[tile].outer``), mask_input (1, S/4, S/4) low-res logits of that tile.
        ``refine``: let the mask refiner sharpen the answer where it acts; ``choose``: let
        the mask chooser rank a lone click's three masks where it acts
        (:mod:`~napari_sam.core.pixel_heads`)."""
        emb = self.embedding_for(plane, tile)
        refine = refine and refines_masks(self.model, self.source.channel, self._enlarged(tile))
        lone_click = (multimask and box is None and mask_input is None and points is not None
                      and len(points) == 1 and labels is not None and int(np.asarray(labels).reshape(-1)[0]) == 1)
        choose = choose and lone_click and chooses_masks(self.model, self.source.channel)
        # the tile's pixels are read again (the cache holds embeddings only) where a head reads them
        pixels = self._refiner_pixels(plane, tile) if refine or choose else None
        with self._decode_lock:
            self._decoder.set_embedding(emb, pixels, refine=refine, choose=choose)
            return self._decoder.predict(points=points, labels=labels, box=box, mask_input=mask_input,
                                         multimask=multimask)
