"""Automatic instance segmentation from the instance decoder's maps (micro-sam's "AIS").

micro-sam's light-microscopy and EM checkpoints carry an instance decoder
(:mod:`napari_sam.model.instance_decoder`) that predicts, for every pixel, the foreground
probability and the distances to its object's centre and boundary, each normalised per
object to [0, 1] (0 at the object's centre, resp. its deepest point; 1 at its boundary
and outside objects). A seeded watershed turns them into instances
(:func:`instances_from_maps`), the way micro-sam's
``InstanceSegmentationWithDecoder.generate`` does with torch-em's
``watershed_from_center_and_boundary_distances``:

1. the foreground map is smoothed (Gaussian, ``foreground_smoothing``) and so are both
   distance maps (``distance_smoothing``, or ``distance_smoothing_per_diameter`` times the
   plane's object diameter, the user's or estimated), to remove the decoder's checkerboard;
2. the foreground mask is ``foreground > foreground_threshold``;
3. seeds are the connected components (8-connected) of the foreground pixels where both
   ``centre distance < center_distance_threshold`` and ``boundary distance <
   boundary_distance_threshold``: near the centre *and* deep inside, so that narrow
   neighbours do not share a seed and non-convex objects do not get several;
4. the seeds grow over the smoothed boundary distances (a watershed, 4-connected) inside
   the foreground mask; foreground pixels that no seed reaches stay background;
5. objects smaller than ``min_size`` pixels are removed and the rest numbered 1..n.

:func:`iter_ais` and :func:`segment_ais` run it on one plane of an
:class:`~napari_sam.core.embeddings.Embeddings`: the maps of every tile are decoded from
the cached embeddings and stitched (:mod:`~napari_sam.auto.instance_maps`), then
post-processed once. :func:`iter_ais_volume` does every plane and links the planes'
objects into 3D (:func:`~napari_sam.auto.link.link_planes`).

Gaussian smoothing here is scipy's with micro-sam's kernel (radius ``ceil(3 sigma)``, the
border mirrored without repeating the edge pixel), which reproduces its filter to float32
rounding; the watershed is scikit-image's. Labels agree with micro-sam's up to pixels
where the flooding order of equal heights differs (docs/instance_decoder.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label
from skimage.segmentation import watershed

from .augmentation import DEFAULT, Augmentation, iter_augmented_maps
from .instance_maps import iter_instance_maps
from .link import link_planes
from .results import Progress, run

__all__ = ["AISSettings", "instances_from_maps", "iter_ais", "iter_ais_volume", "segment_ais", "segment_ais_volume"]


@dataclass(frozen=True)
class AISSettings:
    """Post-processing of the instance decoder's maps.

    The defaults are those of micro-sam 1.8.14's
    ``InstanceSegmentationWithDecoder.generate`` (and of torch-em's
    ``watershed_from_center_and_boundary_distances``, which it calls). micro-sam's
    annotator widget preselects other values per model (its ``_model_settings.AIS_SETTINGS``):
    ``vit_b_lm`` centre 0.4, boundary 0.5, distance smoothing 2.0, min size 100;
    ``vit_l_lm`` 0.4, 0.4, 1.6, 100; ``vit_t_lm`` 0.5, 0.5, 2.0, 100; ``vit_h_lm`` 0.5,
    0.5, 1.4, 100; ``vit_b_em_organelles`` 0.3, 0.4, 1.2, 100 (see
    docs/instance_decoder.md for all of them).

    Attributes
    ----------
    center_distance_threshold
        Seeds are where the (smoothed) centre distance is below this (0.5).
    boundary_distance_threshold
        ... and the (smoothed) boundary distance is below this (0.5).
    foreground_threshold
        Foreground is where the smoothed foreground probability is above this (0.5).
    foreground_smoothing
        Sigma in pixels of the Gaussian applied to the foreground map (1.0); 0 for none.
    distance_smoothing
        Sigma in pixels of the Gaussian applied to both distance maps (1.6); 0 for none.
    min_size
        Objects with fewer pixels are removed (0: none is).
    distance_smoothing_per_diameter
        Above 0: the distance maps' sigma is this share of the plane's object diameter
        (in the maps' pixels: the diameter the user gave the embeddings, else
        :func:`~napari_sam.core.scale.estimate_diameter`'s) in place of
        ``distance_smoothing``, which stays for planes where nothing is found to measure.
        Large objects leave the decoder's normalised distances flat over more pixels, so a
        fixed sigma splits them where a proportional one does not; micro-sam has no such
        setting (0, the default: off).
    """

    center_distance_threshold: float = 0.5
    boundary_distance_threshold: float = 0.5
    foreground_threshold: float = 0.5
    foreground_smoothing: float = 1.0
    distance_smoothing: float = 1.6
    min_size: int = 0
    distance_smoothing_per_diameter: float = 0.0

    def __post_init__(self):
        for name in ("center_distance_threshold", "boundary_distance_threshold", "foreground_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"AIS setting {name} must be a finite number, not {value!r}")
        for name in ("foreground_smoothing", "distance_smoothing", "distance_smoothing_per_diameter"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"AIS setting {name} must be a number >= 0 (a Gaussian sigma), not {value!r}")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, (int, np.integer)) or self.min_size < 0:
            raise ValueError(f"AIS setting min_size must be an integer >= 0, not {self.min_size!r}")


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing with vigra's kernel and border, as micro-sam's filters use them."""
    if sigma <= 0:
        return image
    return ndi.gaussian_filter(image, sigma, mode="mirror", radius=math.ceil(3 * sigma))


def checked_map(name: str, value, shape=None) -> np.ndarray:
    """``value`` as a finite (H, W) float32 map (of ``shape`` when given), else a
    ValueError naming it: the instance decoder's maps as the post-processing takes them."""
    arr = np.asarray(value)
    if arr.ndim != 2 or arr.dtype.kind not in "fiub" or min(arr.shape) < 1:
        raise ValueError(f"{name} must be a non-empty (H, W) array of numbers, got {arr.dtype} {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, the foreground map {shape}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return arr


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Objects under ``min_size`` pixels set to 0, the rest renumbered 1..n in id order."""
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    lut = np.zeros(len(sizes), np.uint32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return lut[labels]


def instances_from_maps(
    foreground, center_distances, boundary_distances, settings: AISSettings | None = None,
    diameter: float | None = None,
) -> np.ndarray:
    """Instances of a plane from the instance decoder's three maps (module docstring).

    Parameters
    ----------
    foreground
        (H, W) foreground probability in [0, 1] (channel 0 of the decoder).
    center_distances
        (H, W) distance to the object's centre, normalised per object (channel 1).
    boundary_distances
        (H, W) distance to the object's boundary, inverted and normalised per object: 0
        at its deepest point, 1 at its boundary (channel 2).
    settings
        :class:`AISSettings`; micro-sam's defaults when None.
    diameter
        The objects' typical diameter in the maps' pixels, for
        ``settings.distance_smoothing_per_diameter``; None where it is unknown.

    Returns
    -------
    numpy.ndarray
        (H, W) uint32 labels in the maps' (row, col) frame, 0 = background, ids 1..n
        without gaps, numbered in the row-major order of their seeds' first pixels (as
        micro-sam numbers them).

    Raises
    ------
    ValueError
        Naming the map that is not a 2D array of finite numbers of the foreground's shape.
    """
    settings = settings or AISSettings()
    fg = checked_map("foreground", foreground)
    center = checked_map("center_distances", center_distances, fg.shape)
    boundary = checked_map("boundary_distances", boundary_distances, fg.shape)
    fg = _smooth(fg, settings.foreground_smoothing)
    sigma = _distance_sigma(settings, diameter)
    center = _smooth(center, sigma)
    boundary = _smooth(boundary, sigma)
    mask = fg > settings.foreground_threshold
    seeds = (center < settings.center_distance_threshold) & (boundary < settings.boundary_distance_threshold) & mask
    markers = label(seeds, connectivity=2).astype(np.int32, copy=False)
    labels = watershed(boundary, markers, mask=mask, connectivity=1)
    return _remove_small(labels, settings.min_size)


def _distance_sigma(settings: AISSettings, diameter: float | None = None) -> float:
    """The Gaussian sigma, in the maps' pixels, that smooths both distance maps."""
    per_diameter = settings.distance_smoothing_per_diameter
    if per_diameter > 0 and diameter is not None and math.isfinite(diameter) and diameter > 0:
        return float(per_diameter * diameter)
    return float(settings.distance_smoothing)


def _plane_diameter(embeddings, plane, settings: AISSettings) -> float | None:
    """The plane's object diameter where ``settings`` scale with it, else None: the
    user's where given, else estimated (once per plane; it reads the plane) by
    :attr:`Embeddings.diameters <napari_sam.core.embeddings.Embeddings.diameters>`."""
    if settings.distance_smoothing_per_diameter <= 0:
        return None
    return embeddings.diameters.of(plane)


def iter_ais(
    embeddings, plane, decoder, settings: AISSettings | None = None, batch_size: int | None = None,
    augment: bool | Augmentation = False,
) -> Generator[Progress, None, np.ndarray]:
    """AIS on one plane: its tiles' maps decoded and stitched, then post-processed once.

    Parameters
    ----------
    embeddings
        The image's :class:`~napari_sam.core.embeddings.Embeddings`; tiles not yet
        embedded are embedded on the way.
    plane
        Flat plane number or (t, z) tuple.
    decoder
        The model's :class:`~napari_sam.model.instance_decoder.InstanceDecoder`, in eval mode.
    settings
        :class:`AISSettings`; micro-sam's defaults when None.
    batch_size
        Tiles decoded at once (default: :func:`~napari_sam.auto.instance_maps.default_batch_size`).
    augment
        Average the maps of the plane seen enlarged and mirrored before post-processing
        (:mod:`~napari_sam.auto.augmentation`): ``True`` for its ``DEFAULT`` views, an
        ``Augmentation`` for others, ``False`` (default) for the embeddings alone.

    Yields
    ------
    Progress
        After each tile (``stage="tiles"``; with ``augment``, each tile of each view);
        closing the generator cancels the rest.

    Returns
    -------
    numpy.ndarray
        Through ``StopIteration.value``: (H, W) uint32 labels of the plane, as
        :func:`instances_from_maps`. The post-processing runs on the whole plane's maps
        at once (12 bytes per pixel for the maps, a few times that while it works): fine
        for planes of tens of megapixels; larger planes would need it blockwise.
    """
    settings = settings or AISSettings()
    if not isinstance(augment, (bool, np.bool_, Augmentation)):
        raise ValueError(f"augment must be True, False or an Augmentation, not {augment!r}")
    if isinstance(augment, Augmentation) or augment:
        views = augment if isinstance(augment, Augmentation) else DEFAULT
        maps = yield from iter_augmented_maps(embeddings, plane, decoder, views, batch_size)
    else:
        maps = yield from iter_instance_maps(embeddings, plane, decoder, batch_size)
    return instances_from_maps(maps[0], maps[1], maps[2], settings, _plane_diameter(embeddings, plane, settings))


def segment_ais(
    embeddings,
    plane,
    decoder,
    settings: AISSettings | None = None,
    progress: Callable[[Progress], object] | None = None,
    *,
    batch_size: int | None = None,
    augment: bool | Augmentation = False,
) -> np.ndarray:
    """:func:`iter_ais` in one call; ``progress`` (if given) is called with each
    :class:`~napari_sam.auto.results.Progress`. Returns (H, W) uint32 labels."""
    return run(iter_ais(embeddings, plane, decoder, settings, batch_size, augment), progress)


def iter_ais_volume(
    embeddings, decoder, planes=None, settings: AISSettings | None = None, link_iou: float = 0.3,
    batch_size: int | None = None,
) -> Generator[Progress, None, tuple[np.ndarray, list[np.ndarray]]]:
    """AIS on several planes, their objects linked into 3D
    (:func:`~napari_sam.auto.link.link_planes`).

    Parameters
    ----------
    embeddings
        The image's embeddings.
    decoder
        The instance decoder, in eval mode.
    planes
        Flat plane numbers or (t, z) tuples, in order (default: all planes).
    settings
        :class:`AISSettings`.
    link_iou
        ``min_iou`` of :func:`~napari_sam.auto.link.link_planes`.
    batch_size
        Tiles decoded at once.

    Yields
    ------
    Progress
        After each tile of each plane (``stage="tiles"``) and after each plane
        (``stage="planes"``).

    Returns
    -------
    (numpy.ndarray, list of numpy.ndarray)
        The (Z, H, W) uint32 label volume with 3D ids, and each plane's (H, W) labels
        with its own 2D ids.
    """
    planes = list(range(embeddings.source.n_planes)) if planes is None else list(planes)
    if not planes:
        raise ValueError("no planes to segment")
    if not 0 <= link_iou <= 1:
        raise ValueError(f"link_iou must be in [0, 1], got {link_iou}")
    results = []
    for i, plane in enumerate(planes, start=1):
        results.append((yield from iter_ais(embeddings, plane, decoder, settings, batch_size)))
        yield Progress(i, len(planes), embeddings.source.flat_index(plane), None, "planes")
    return link_planes(results, link_iou), results


def segment_ais_volume(
    embeddings, decoder, planes=None, settings: AISSettings | None = None, link_iou: float = 0.3,
    progress: Callable[[Progress], object] | None = None,
) -> np.ndarray:
    """:func:`iter_ais_volume` in one call; returns the (Z, H, W) uint32 label volume."""
    return run(iter_ais_volume(embeddings, decoder, planes, settings, link_iou), progress)[0]
