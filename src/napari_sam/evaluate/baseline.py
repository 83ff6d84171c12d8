"""A classical baseline for prompted segmentation: seeded watershed.

The tool offers it beside SAM, and the evaluation measures both on the same prompts, so
that a number for SAM always comes with the number a simple method reaches.
:class:`WatershedBaseline` answers the prompts SAM answers for one object (points with
foreground/background labels, a box, or both) and returns a boolean mask:

* the plane is smoothed (Gaussian) and its Sobel gradient magnitude is the relief that
  is flooded; object boundaries sit on the gradient's ridges;
* an Otsu threshold of the smoothed plane tells foreground from background, refined
  by a local threshold (the Gaussian-weighted mean of a neighbourhood): microscopy
  planes are unevenly lit, and one global threshold loses dim objects or fattens bright
  ones (on the DSB nuclei of the tests, the foreground's IoU with the ground truth goes
  from 0.73 to 0.85);
* markers: the foreground points are the object's seeds; background points, everything
  outside the box, the Otsu background a few pixels away from any foreground, and the
  centres of *other* objects (peaks of the foreground's distance transform that are not
  the clicked object's) are "not the object". The competing centres are what keeps the
  flood from running into touching neighbours, which share the Otsu foreground;
* with a box and no foreground point, the object's seed is the deepest foreground
  inside the box.

Coordinates are (x, y) = (column, row) for points, (x0, y0, x1, y1) for boxes, as for
:class:`~napari_sam.core.predictor.Predictor`; the mask is a (row, col) array.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import gaussian, sobel, threshold_local, threshold_otsu
from skimage.segmentation import watershed

from ..core.masks import deepest_pixel, depth
from ..core.preprocess import to_rgb
from ..core.prompts import check_boxes, check_points_inside
from ..core.stain import haematoxylin, looks_brightfield

__all__ = ["WatershedBaseline", "watershed_instances", "watershed_segment"]

_OBJECT, _OTHER = 1, 2


class WatershedBaseline:
    """Seeded watershed answering point and box prompts on one plane at a time.

    Used like :class:`~napari_sam.core.predictor.Predictor`: :meth:`set_image` once per
    plane (smoothing, gradient and threshold are computed there), then :meth:`predict`
    per object.

    Parameters
    ----------
    sigma
        Standard deviation (pixels) of the Gaussian smoothing before the gradient and
        the threshold; noise otherwise makes ridges everywhere.
    background_margin
        Otsu background pixels closer than this (pixels) to the foreground are left
        unassigned, so that the gradient, not the threshold, places the boundary.
    peak_depth
        Competing object centres are maxima of the foreground's distance transform that
        rise at least this much (pixels) above their surroundings (h-maxima); shallower
        bumps are one object's irregular outline, not another object.
    box_margin
        Pixels outside the box by more than this are background markers.
    local_block
        Side (pixels, odd) of the neighbourhood of the local threshold, about twice an
        object's diameter; None for the global Otsu threshold alone.
    local_offset
        A pixel is foreground when it exceeds its neighbourhood's mean by this much
        (fraction of the plane's intensity range) and half the Otsu threshold.

    Examples
    --------
    >>> ws = WatershedBaseline()                                  # doctest: +SKIP
    >>> ws.set_image(nuclei)                                      # doctest: +SKIP
    >>> mask = ws.predict(points=[[120, 85]], labels=[1])         # doctest: +SKIP
    """

    def __init__(
        self,
        sigma: float = 2.0,
        background_margin: int = 2,
        peak_depth: float = 2.0,
        box_margin: int = 1,
        local_block: int | None = 51,
        local_offset: float = 0.01,
    ):
        if local_block is not None and (local_block < 3 or local_block % 2 == 0):
            raise ValueError(f"local_block must be an odd number >= 3 (or None), got {local_block}")
        if sigma < 0 or background_margin < 0 or peak_depth <= 0 or box_margin < 0:
            raise ValueError(
                "sigma, background_margin and box_margin must be >= 0 and peak_depth > 0, got "
                f"sigma={sigma}, background_margin={background_margin}, peak_depth={peak_depth}, "
                f"box_margin={box_margin}"
            )
        self.sigma = float(sigma)
        self.background_margin = int(background_margin)
        self.peak_depth = float(peak_depth)
        self.box_margin = int(box_margin)
        self.local_block = local_block
        self.local_offset = float(local_offset)
        self._shape: tuple[int, int] | None = None

    def set_image(self, image: np.ndarray, channel_axis: int | None = None, channel: int | None = None) -> None:
        """Prepare a plane: smoothing, gradient, Otsu foreground, candidate object centres.

        Parameters
        ----------
        image
            (H, W) grayscale, (H, W, 3|4) RGB(A), or multichannel with ``channel_axis``
            and ``channel`` (see :func:`~napari_sam.core.preprocess.to_rgb`).
        """
        image = np.asarray(image)
        if image.ndim == 2 and channel_axis is None:
            gray = image.astype(np.float32)
        else:
            rgb = to_rgb(image, channel_axis, channel)
            # H&E: nuclei as the haematoxylin stain (classical pipelines' reading), not dark
            stained = channel is None and looks_brightfield(rgb)
            gray = haematoxylin(rgb) if stained else rgb.astype(np.float32).mean(axis=-1)
        if gray.ndim != 2 or min(gray.shape) == 0:
            raise ValueError(f"the baseline segments one non-empty 2D plane, got shape {image.shape}")
        lo, hi = float(gray.min()), float(gray.max())
        # Scale to [0, 1] so that the gradient does not depend on the dtype's range.
        gray = (gray - lo) / (hi - lo) if hi > lo else np.zeros_like(gray)
        smooth = gaussian(gray, sigma=self.sigma, preserve_range=True) if self.sigma > 0 else gray
        self._shape = gray.shape
        self._gradient = sobel(smooth)
        if hi > lo:
            otsu = threshold_otsu(smooth)
            if self.local_block is None:
                self._foreground = smooth > otsu
            else:
                local = threshold_local(smooth, self.local_block, offset=-self.local_offset)
                self._foreground = (smooth > local) & (smooth > 0.5 * otsu)
        else:
            self._foreground = np.zeros(gray.shape, bool)
        if self.background_margin > 0:
            near = ndimage.binary_dilation(self._foreground, iterations=self.background_margin)
        else:
            near = self._foreground
        self._far_background = ~near
        self._depth = ndimage.distance_transform_edt(self._foreground)
        self._centres = self._object_centres()

    def _object_centres(self) -> np.ndarray:
        """(K, 2) (row, col) maxima of the distance transform deeper than ``peak_depth``."""
        if not self._foreground.any():
            return np.zeros((0, 2), int)
        # h-maxima by reconstruction: peaks that do not rise peak_depth above the
        # surrounding saddle vanish; the plateaus left are the object centres.
        seed = np.maximum(self._depth - self.peak_depth, 0)
        recon = _reconstruct(seed, self._depth)
        peaks = (self._depth - recon) >= self.peak_depth - 1e-6
        lab, n = ndimage.label(peaks)
        if n == 0:
            return np.zeros((0, 2), int)
        # one pixel per plateau: its deepest one
        idx = ndimage.maximum_position(self._depth, lab, np.arange(1, n + 1))
        return np.asarray(idx, dtype=int).reshape(-1, 2)

    def instances(self, min_area: int = 15) -> np.ndarray:
        """Every object of the current plane at once, without prompts: the classical
        instance segmentation the automatic modes are measured against.

        Each object centre (:meth:`set_image`), and the deepest pixel of each foreground
        component too thin to have one, seeds an object grown over the inverted distance
        transform inside the foreground: touching objects split where they narrow.

        Parameters
        ----------
        min_area
            Objects with fewer pixels are dropped.

        Returns
        -------
        numpy.ndarray
            (H, W) uint32 labels (row, col), 0 = background, ids 1..n.
        """
        H, W = self.shape
        centres = self._centres
        markers = np.zeros((H, W), np.int32)
        markers[centres[:, 0], centres[:, 1]] = np.arange(1, len(centres) + 1)
        comp, n = ndimage.label(self._foreground)
        seeded = np.zeros(n + 1, bool)
        seeded[comp[centres[:, 0], centres[:, 1]]] = True
        bare = np.flatnonzero(~seeded[1:]) + 1
        if len(bare):
            rows, cols = np.asarray(ndimage.maximum_position(self._depth, comp, bare), dtype=int).reshape(-1, 2).T
            markers[rows, cols] = len(centres) + np.arange(1, len(bare) + 1)
        labels = watershed(-self._depth, markers, mask=self._foreground)
        ids, counts = np.unique(labels[labels > 0], return_counts=True)
        keep = ids[counts >= max(min_area, 1)]
        lut = np.zeros(int(labels.max()) + 1, np.uint32)
        lut[keep] = np.arange(1, len(keep) + 1, dtype=np.uint32)
        return lut[labels]

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the current plane."""
        if self._shape is None:
            raise RuntimeError("no image is set: call set_image() before predict()")
        return self._shape

    def predict(self, points=None, labels=None, box=None) -> np.ndarray:
        """The mask of one object from its prompts.

        Parameters
        ----------
        points
            (N, 2) (x, y) pixel coordinates, or None.
        labels
            (N,) 1 foreground / 0 background; all foreground when omitted.
        box
            (x0, y0, x1, y1), or None.

        Returns
        -------
        numpy.ndarray
            (H, W) bool mask of the object; empty when the prompts hold no object.
        """
        H, W = self.shape
        pts = np.zeros((0, 2)) if points is None else np.asarray(points, dtype=np.float64).reshape(-1, 2)
        lbl = np.ones(len(pts), np.int64) if labels is None else np.asarray(labels).reshape(-1).astype(np.int64)
        if len(lbl) != len(pts):
            raise ValueError(f"{len(pts)} point(s) but {len(lbl)} label(s)")
        if not np.isin(lbl, (0, 1)).all():
            raise ValueError(f"point labels must be 1 (foreground) or 0 (background), got {np.unique(lbl)}")
        if len(pts):
            check_points_inside(pts, H, W)
        bx = None if box is None else check_boxes(np.asarray(box, dtype=np.float64).reshape(1, 4), H, W)[0]
        fg = pts[lbl == 1]
        if bx is None and len(fg) == 0:
            raise ValueError("an object needs a box or at least one foreground point")
        # pixel (row, col) of each point
        fg_rc = np.column_stack([np.clip(fg[:, 1].astype(int), 0, H - 1), np.clip(fg[:, 0].astype(int), 0, W - 1)])
        bg = pts[lbl == 0]
        bg_rc = np.column_stack([np.clip(bg[:, 1].astype(int), 0, H - 1), np.clip(bg[:, 0].astype(int), 0, W - 1)])

        y0, y1, x0, x1 = self._window(fg_rc, bg_rc, bx)
        win = (slice(y0, y1), slice(x0, x1))
        markers = np.zeros((y1 - y0, x1 - x0), np.int32)
        markers[self._far_background[win]] = _OTHER
        if bx is not None:
            m = self.box_margin
            inside = np.zeros_like(markers, bool)
            by0, by1 = max(int(np.floor(bx[1])) - m - y0, 0), min(int(np.ceil(bx[3])) + 1 + m - y0, y1 - y0)
            bx0, bx1 = max(int(np.floor(bx[0])) - m - x0, 0), min(int(np.ceil(bx[2])) + 1 + m - x0, x1 - x0)
            inside[by0:by1, bx0:bx1] = True
            markers[~inside] = _OTHER
        for r, c in self._competing_centres(fg_rc, bx, (y0, y1, x0, x1)):
            markers[r - y0, c - x0] = _OTHER
        for r, c in bg_rc:
            markers[r - y0, c - x0] = _OTHER
        if len(fg_rc):
            seeds = fg_rc
        else:
            seeds = self._box_seed(bx, (y0, y1, x0, x1))
            if seeds is None:
                return np.zeros((H, W), bool)
        for r, c in seeds:
            markers[r - y0, c - x0] = _OBJECT  # the user's clicks win over any other marker
        flooded = watershed(self._gradient[win], markers) == _OBJECT
        # Keep the pieces holding a seed (a background marker can cut the flood in two).
        lab, _ = ndimage.label(flooded)
        keep = np.unique(lab[seeds[:, 0] - y0, seeds[:, 1] - x0])
        obj = np.isin(lab, keep[keep > 0])
        obj = ndimage.binary_fill_holes(obj)
        out = np.zeros((H, W), bool)
        out[win] = obj
        return out

    def _window(self, fg_rc, bg_rc, bx) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) region that holds the object: the prompts, the foreground
        components they touch and a margin. Flooding only this keeps a click cheap on
        large planes."""
        H, W = self.shape
        rows, cols = [], []
        if len(fg_rc):
            lab, _ = ndimage.label(self._foreground)
            ids = np.unique(lab[fg_rc[:, 0], fg_rc[:, 1]])
            ids = ids[ids > 0]
            if len(ids):
                sl = ndimage.find_objects(lab)
                for i in ids:
                    rows += [sl[i - 1][0].start, sl[i - 1][0].stop - 1]
                    cols += [sl[i - 1][1].start, sl[i - 1][1].stop - 1]
            rows += list(fg_rc[:, 0])
            cols += list(fg_rc[:, 1])
        if len(bg_rc):
            rows += list(bg_rc[:, 0])
            cols += list(bg_rc[:, 1])
        if bx is not None:
            rows += [int(bx[1]), int(np.ceil(bx[3]))]
            cols += [int(bx[0]), int(np.ceil(bx[2]))]
        margin = 8 + self.background_margin + self.box_margin
        return (
            max(min(rows) - margin, 0),
            min(max(rows) + margin + 1, H),
            max(min(cols) - margin, 0),
            min(max(cols) + margin + 1, W),
        )

    def _competing_centres(self, fg_rc, bx, window) -> list[tuple[int, int]]:
        """Centres of other objects inside the window: those not within the inscribed
        circle of a foreground click (that is the clicked object's own centre) and, with
        a box, not inside the box (the box holds one object)."""
        y0, y1, x0, x1 = window
        c = self._centres
        c = c[(c[:, 0] >= y0) & (c[:, 0] < y1) & (c[:, 1] >= x0) & (c[:, 1] < x1)]
        keep = np.ones(len(c), bool)
        for r, col in fg_rc:
            radius = max(float(self._depth[r, col]), 1.0)
            keep &= np.hypot(c[:, 0] - r, c[:, 1] - col) > radius + 1
        if bx is not None:
            inside = (c[:, 1] >= bx[0]) & (c[:, 1] <= bx[2]) & (c[:, 0] >= bx[1]) & (c[:, 0] <= bx[3])
            keep &= ~inside
        return [tuple(p) for p in c[keep]]

    def _box_seed(self, bx, window) -> np.ndarray | None:
        """(1, 2) (row, col) seed for a box alone: its deepest foreground pixel."""
        H, W = self.shape
        r0, r1 = int(np.floor(bx[1])), min(int(np.ceil(bx[3])) + 1, H)
        c0, c1 = int(np.floor(bx[0])), min(int(np.ceil(bx[2])) + 1, W)
        # depth measured inside the box only (its edge counts as boundary): a neighbour
        # outside it must not win
        pixel = deepest_pixel(depth(self._foreground[r0:r1, c0:c1]))
        if pixel is None:
            return None
        return np.array([[r0 + pixel[0], c0 + pixel[1]]])


def _reconstruct(seed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Grey-scale reconstruction by dilation of ``seed`` under ``mask``."""
    from skimage.morphology import reconstruction

    return reconstruction(np.minimum(seed, mask), mask, method="dilation")


def watershed_segment(image: np.ndarray, points=None, labels=None, box=None, **options) -> np.ndarray:
    """One object of a plane by seeded watershed (see :class:`WatershedBaseline`).

    Parameters
    ----------
    image
        (H, W) or (H, W, 3) plane.
    points, labels, box
        Prompts as for :meth:`WatershedBaseline.predict`.
    **options
        Passed to :class:`WatershedBaseline`.

    Returns
    -------
    numpy.ndarray
        (H, W) bool mask.
    """
    ws = WatershedBaseline(**options)
    ws.set_image(image)
    return ws.predict(points, labels, box)


def watershed_instances(image: np.ndarray, min_area: int = 15, **options) -> np.ndarray:
    """Every object of a plane by the classical baseline (:meth:`WatershedBaseline.instances`).

    RGB that looks like brightfield (:func:`~napari_sam.core.stain.looks_brightfield`, the
    models' stain rule) is read as its haematoxylin density (nuclei bright), other RGB as
    its channels' mean. A grey plane is inverted when its Otsu foreground covers more than
    half of it: objects are the minority, so dark objects on a bright background are
    found as bright ones on a dark one are. ``options`` go to :class:`WatershedBaseline`;
    its defaults here (``sigma=1``, ``peak_depth=15``: touching objects split only at a
    clear neck) measured mSA 0.326 / AP50 0.569 on the DSB 2018 images the default model
    trains on (not the held-out ones), against 0.224 / 0.436 with the prompted defaults.

    Parameters
    ----------
    image
        (H, W) or (H, W, 3|4) plane.
    min_area
        Objects with fewer pixels are dropped.

    Returns
    -------
    numpy.ndarray
        (H, W) uint32 labels, 0 = background, ids 1..n.
    """
    options = {"sigma": 1.0, "peak_depth": 15.0} | options
    image = np.asarray(image)
    rgb = None if image.ndim == 2 else to_rgb(image)
    if rgb is not None and looks_brightfield(rgb):
        gray = haematoxylin(rgb)
    else:
        gray = (image if rgb is None else rgb.mean(axis=-1)).astype(np.float32)
        if gray.ndim != 2 or min(gray.shape) == 0:
            raise ValueError(f"the baseline segments one non-empty 2D plane, got shape {image.shape}")
        lo, hi = float(gray.min()), float(gray.max())
        if hi > lo and (gray > threshold_otsu(gray)).mean() > 0.5:
            gray = hi + lo - gray
    ws = WatershedBaseline(**options)
    ws.set_image(gray)
    return ws.instances(min_area)
