"""Measuring segmentation quality against instance ground truth.

Three measurements, each returning a JSON-able dict (``"kind"`` says which) that
:func:`format_table` turns into a markdown table:

* **Prompted** (:func:`evaluate_prompted`): every ground-truth object (or a seeded sample
  of them) is prompted the way the SAM paper and micro-sam evaluate interactive
  segmentation: one point (the object's pixel farthest from its boundary), its bounding
  box, and iterative correction starting from the point, each step adding one point in
  the largest error region (foreground where the object was missed, background where
  the mask spilled over) and, for SAM, passing the previous low-res logits as the mask
  input. The result is the mean IoU per prompt type and after each correction. It runs
  with a SAM :class:`~napari_sam.core.predictor.Predictor` or with the classical
  :class:`~napari_sam.core.baseline.WatershedBaseline` (whose corrective points become
  markers), so every number for SAM comes with the baseline's. A plane larger than the
  model input is answered as the plugin answers it: object by object through
  :meth:`~napari_sam.core.embeddings.Embeddings.segment` on full-resolution tiles
  (corrections send all points and the previous answer as mask prompt, as the
  viewer does), not shrunk to the input.
* **Automatic** (:func:`evaluate_automatic`): a label image per image from any
  segmenter (e.g. :func:`grid_segmenter`), scored by the mean segmentation accuracy
  (mSA) and the accuracy at IoU 0.5 and 0.75 (see :func:`segmentation_accuracy`).
* **Propagation** (:func:`evaluate_propagation`): a callable that spreads a mask from
  one plane through a volume, started from each object's ground-truth mask on its
  middle plane, scored by the mean 3D IoU.

Image/label pairs come from a folder (``images/*.tif`` + ``labels/*.tif`` with the same
names), a Zarr group with ``images`` and ``labels`` arrays, or arrays
(:func:`load_pairs`). On CPU, ``max_objects`` samples a fixed number of objects per image
(with a seed) to keep the prompted evaluation affordable.

Metric definitions. Two objects match at threshold t when their IoU is *above* t
(strictly; for t >= 0.5 a ground-truth object then matches at most one predicted object
and vice versa). With TP matched pairs, FP unmatched predictions and FN unmatched
ground-truth objects, the accuracy at t is ``TP / (TP + FP + FN)``: the "average
precision" of the 2018 Data Science Bowl (which is not the area under a
precision-recall curve). ``ap50`` and ``ap75`` are that accuracy at t = 0.5 and 0.75;
``msa`` is its mean over t = 0.50, 0.55, ..., 0.95, the DSB score and micro-sam's mean
segmentation accuracy. An image with no objects in either label image scores 1. The
scores of a data set are means over its images.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .baseline import WatershedBaseline
from .predictor import Predictor
from .prompt_simulation import bounding_box, corrective_point, interior_point

__all__ = [
    "EvalPair",
    "EvalProgress",
    "THRESHOLDS",
    "evaluate_automatic",
    "evaluate_prompted",
    "evaluate_propagation",
    "format_table",
    "grid_segmenter",
    "instance_scores",
    "iter_evaluate_automatic",
    "iter_evaluate_prompted",
    "load_pairs",
    "mean_segmentation_accuracy",
    "pairs_from_arrays",
    "sam_propagator",
    "segmentation_accuracy",
    "watershed_propagator",
]

THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
"""IoU thresholds 0.50, 0.55, ..., 0.95 of the mean segmentation accuracy."""


# -- data ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalPair:
    """One image and its instance labels.

    Attributes
    ----------
    image
        (H, W) or (H, W, C) plane (or a (Z, H, W) volume for propagation).
    labels
        Integer instance labels covering the same pixels, 0 = background.
    name
        Where it came from.
    """

    image: np.ndarray
    labels: np.ndarray
    name: str


@dataclass(frozen=True)
class EvalProgress:
    """Progress of an evaluation: ``done`` of ``total`` images, the last one ``name``."""

    done: int
    total: int
    name: str


def _check_pair(image: np.ndarray, labels: np.ndarray, name: str) -> None:
    if labels.dtype.kind not in "iub":
        raise ValueError(f"{name}: labels must be integer instance ids, got dtype {labels.dtype}")
    if image.shape[: labels.ndim] != labels.shape:
        raise ValueError(f"{name}: image {image.shape} and labels {labels.shape} do not cover the same pixels")


def pairs_from_arrays(images, labels, names: Sequence[str] | None = None) -> list[EvalPair]:
    """Pairs from stacks: (N, H, W[, C]) images and (N, H, W) labels, or one plane each."""
    images, labels = np.asarray(images), np.asarray(labels)
    if labels.ndim == 2:
        images, labels = images[None], labels[None]
    if labels.ndim != 3 or len(images) != len(labels):
        raise ValueError(
            f"expected (N, H, W) labels and N images, got images {images.shape} and labels {labels.shape}"
        )
    names = list(names) if names is not None else [f"image {i}" for i in range(len(labels))]
    if len(names) != len(labels):
        raise ValueError(f"{len(names)} names for {len(labels)} pairs")
    out = [EvalPair(images[i], labels[i], names[i]) for i in range(len(labels))]
    for p in out:
        _check_pair(p.image, p.labels, p.name)
    return out


def load_pairs(source, image_key: str = "images", label_key: str = "labels") -> list[EvalPair]:
    """Image/label pairs from a folder, a Zarr group or arrays.

    Parameters
    ----------
    source
        * a folder with ``images/*.tif`` and ``labels/*.tif`` of the same names (as
          ``/work/shared/data/dsb2018_fluo``);
        * a Zarr group (path) with arrays ``image_key`` and ``label_key``: one plane
          each, or stacks of planes along the first axis;
        * a sequence of ``(image, labels)`` tuples or :class:`EvalPair`.
    image_key, label_key
        Array names in a Zarr group.

    Returns
    -------
    list of EvalPair
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"{path} does not exist")
        # A Zarr group first: its arrays are folders named like the TIFF folders.
        if path.is_dir() and any((path / f).exists() for f in ("zarr.json", ".zgroup")):
            import zarr

            group = zarr.open_group(str(path), mode="r")
            keys = set(group.array_keys())
            if image_key not in keys or label_key not in keys:
                raise ValueError(
                    f"Zarr group {path} needs arrays {image_key!r} and {label_key!r}, it has {sorted(keys)}"
                )
            return pairs_from_arrays(group[image_key][...], group[label_key][...])
        if (path / "images").is_dir() and (path / "labels").is_dir():
            return _pairs_from_folder(path)
        raise ValueError(f"{path} is neither a folder with images/ and labels/ nor a Zarr group")
    pairs = []
    for i, item in enumerate(source):
        if isinstance(item, EvalPair):
            pairs.append(item)
            continue
        try:
            image, labels = item
        except (TypeError, ValueError):
            raise ValueError(f"item {i}: expected an (image, labels) pair or an EvalPair") from None
        image, labels = np.asarray(image), np.asarray(labels)
        _check_pair(image, labels, f"pair {i}")
        pairs.append(EvalPair(image, labels, f"pair {i}"))
    return pairs


def _pairs_from_folder(path: Path) -> list[EvalPair]:
    import tifffile

    images = sorted(p for p in (path / "images").iterdir() if p.suffix.lower() in (".tif", ".tiff"))
    if not images:
        raise ValueError(f"no .tif images in {path / 'images'}")
    pairs = []
    for img_path in images:
        lab_path = path / "labels" / img_path.name
        if not lab_path.exists():
            raise ValueError(f"{img_path.name} has no label image {lab_path}")
        image, labels = tifffile.imread(img_path), tifffile.imread(lab_path)
        _check_pair(image, labels, img_path.name)
        pairs.append(EvalPair(image, labels, img_path.stem))
    return pairs


def _object_ids(labels: np.ndarray, min_area: int, max_objects: int | None, rng: np.random.Generator) -> np.ndarray:
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    ids = ids[counts >= max(min_area, 1)]
    if max_objects is not None and len(ids) > max_objects:
        ids = np.sort(rng.choice(ids, size=max_objects, replace=False))
    return ids


# -- metrics ---------------------------------------------------------------------------------
def _pair_iou(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(n_gt, n_pred) IoU of the objects of two label images (ids need not be consecutive)."""
    gt_ids, gt_area = np.unique(gt[gt > 0], return_counts=True)
    pr_ids, pr_area = np.unique(pred[pred > 0], return_counts=True)
    iou = np.zeros((len(gt_ids), len(pr_ids)))
    both = (gt > 0) & (pred > 0)
    if both.any():
        stacked = np.stack([gt[both].astype(np.int64), pred[both].astype(np.int64)])
        pairs, inter = np.unique(stacked, axis=1, return_counts=True)
        i, j = np.searchsorted(gt_ids, pairs[0]), np.searchsorted(pr_ids, pairs[1])
        iou[i, j] = inter / (gt_area[i] + pr_area[j] - inter)
    return iou


def _check_labels(gt, pred) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    if gt.dtype.kind not in "iub" or pred.dtype.kind not in "iub":
        raise ValueError(f"label images must be integer, got {gt.dtype} and {pred.dtype}")
    return gt, pred


def _accuracy(iou: np.ndarray, threshold: float) -> float:
    n_gt, n_pred = iou.shape
    if n_gt == 0 and n_pred == 0:
        return 1.0
    # above 0.5 a match is unique, so counting pairs counts true positives
    tp = int((iou > threshold).sum()) if threshold >= 0.5 else _matched(iou, threshold)
    return tp / (n_gt + n_pred - tp)


def _matched(iou: np.ndarray, threshold: float) -> int:
    from scipy.optimize import linear_sum_assignment

    if iou.size == 0:
        return 0
    r, c = linear_sum_assignment(iou, maximize=True)
    return int((iou[r, c] > threshold).sum())


def segmentation_accuracy(gt, pred, threshold: float = 0.5) -> float:
    """TP / (TP + FP + FN) at one IoU threshold (the DSB 2018 "average precision").

    Parameters
    ----------
    gt, pred
        Integer label images of the same shape, 0 = background.
    threshold
        Objects match when their IoU is above this. Below 0.5 matches are made
        one-to-one by Hungarian assignment.

    Returns
    -------
    float
        In [0, 1]; 1 when neither image has objects.
    """
    gt, pred = _check_labels(gt, pred)
    return _accuracy(_pair_iou(gt, pred), threshold)


def mean_segmentation_accuracy(gt, pred, thresholds: Sequence[float] = THRESHOLDS) -> float:
    """:func:`segmentation_accuracy` averaged over IoU thresholds (0.50:0.05:0.95)."""
    gt, pred = _check_labels(gt, pred)
    iou = _pair_iou(gt, pred)
    return float(np.mean([_accuracy(iou, t) for t in thresholds]))


def instance_scores(gt, pred) -> dict:
    """``{"msa", "ap50", "ap75", "n_gt", "n_pred"}`` of one prediction (see the module
    docstring for the definitions)."""
    gt, pred = _check_labels(gt, pred)
    iou = _pair_iou(gt, pred)
    return {
        "msa": float(np.mean([_accuracy(iou, t) for t in THRESHOLDS])),
        "ap50": _accuracy(iou, 0.5),
        "ap75": _accuracy(iou, 0.75),
        "n_gt": int(iou.shape[0]),
        "n_pred": int(iou.shape[1]),
    }


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


# -- prompted --------------------------------------------------------------------------------
def _box_of(mask: np.ndarray) -> np.ndarray:
    """The object's bounding box (last row/column inclusive, as SAM's training boxes),
    one pixel wider where the object is one pixel thin (a box needs x1 > x0)."""
    H, W = mask.shape
    box = bounding_box(mask)
    for lo, hi, size in ((0, 2, W), (1, 3, H)):
        if box[hi] <= box[lo]:
            if box[hi] + 1 < size:
                box[hi] += 1
            else:
                box[lo] -= 1
    return box


class _SamRunner:
    """Prompts a batch of objects of one image through a SAM predictor."""

    def __init__(self, predictor: Predictor, multimask_point: bool, batch_size: int, refine: bool = True):
        self.predictor = predictor
        self.multimask_point = multimask_point
        self.batch_size = batch_size
        self.refine = refine
        self.tiles = None

    def set_image(self, image):
        image = np.asarray(image)
        self.tiles = None
        if max(image.shape[:2]) > self.predictor.model.config.image_size:
            # Larger than the model input: measure what the plugin does with such a
            # plane (tiles of the model input at full resolution, objects merged across
            # tiles), not a shrunken whole plane.
            from .embeddings import Embeddings

            axes = "YX" if image.ndim == 2 else "YXC"
            self.tiles = Embeddings(
                image, self.predictor.model, cache=False, axes=axes,
                normalization=self.predictor.normalization, statistics="plane",
            )
        else:
            self.predictor.set_image(image)

    def run(self, masks: list[np.ndarray], n_corrections: int, rng) -> tuple[list, list, list]:
        if self.tiles is not None:
            return self._tiled(masks, n_corrections, rng)
        point_iou, box_iou, iter_iou = [], [], []
        for s in range(0, len(masks), self.batch_size):
            chunk = masks[s : s + self.batch_size]
            p, b, it = self._chunk(chunk, n_corrections, rng)
            point_iou += p
            box_iou += b
            iter_iou += it
        return point_iou, box_iou, iter_iou

    def _chunk(self, masks, n_corrections, rng):
        pr = self.predictor
        B = len(masks)
        rows = np.arange(B)
        points = np.stack([interior_point(m) for m in masks])[:, None, :]  # (B, 1, 2)
        labels = np.ones((B, 1), np.int64)
        first = pr.predict_batch(points=points, labels=labels, multimask=self.multimask_point)
        best = np.argmax(first.iou, axis=1)
        pred = first.best_mask()
        low = first.low_res_logits[rows, best]
        point_iou = [_iou(pred[i], masks[i]) for i in range(B)]
        boxes = np.stack([_box_of(m) for m in masks])
        box_pred = pr.predict_batch(boxes=boxes, multimask=False).best_mask()
        box_iou = [_iou(box_pred[i], masks[i]) for i in range(B)]
        history = [list(point_iou)]
        done = np.zeros(B, bool)
        for _ in range(n_corrections):
            new_pts, new_lbl = [], []
            for i in range(B):
                nxt = None if done[i] else corrective_point(masks[i], pred[i], rng, "center")
                if nxt is None:
                    # A perfect mask needs no click; the batch needs a point per object
                    # all the same: repeat the last one and keep the old answer.
                    done[i] = True
                    new_pts.append(points[i, -1])
                    new_lbl.append(labels[i, -1])
                else:
                    new_pts.append(nxt[0])
                    new_lbl.append(nxt[1])
            points = np.concatenate([points, np.asarray(new_pts)[:, None, :]], axis=1)
            labels = np.concatenate([labels, np.asarray(new_lbl, np.int64)[:, None]], axis=1)
            if not done.all():
                out = pr.predict_batch(points=points, labels=labels, mask_input=low[:, None], multimask=False)
                new_pred = out.best_mask()
                new_low = out.low_res_logits[:, 0]
                pred = np.where(done[:, None, None], pred, new_pred)
                low = np.where(done[:, None, None], low, new_low)
            history.append([_iou(pred[i], masks[i]) for i in range(B)])
        return point_iou, box_iou, [list(x) for x in zip(*history)]

    def _tiled(self, masks, n_corrections, rng):
        # One object at a time through Embeddings.segment, as a click in the viewer is
        # answered; corrections send all points and the previous answer's logits.
        emb = self.tiles
        shape = masks[0].shape
        point_iou, box_iou, iter_iou = [], [], []
        for m in masks:
            pts, lbl = [interior_point(m)], [1]
            answer = emb.segment(0, points=np.array(pts), labels=np.array(lbl), multimask=self.multimask_point)
            pred = answer.to_full(shape)
            point_iou.append(_iou(pred, m))
            box_iou.append(_iou(emb.segment(0, box=_box_of(m), multimask=False).to_full(shape), m))
            history = [point_iou[-1]]
            for _ in range(n_corrections):
                nxt = corrective_point(m, pred, rng, "center")
                if nxt is not None:
                    pts.append(nxt[0])
                    lbl.append(int(nxt[1]))
                    previous = answer if self.refine else None
                    answer = emb.segment(0, points=np.array(pts), labels=np.array(lbl), multimask=False, previous=previous)
                    pred = answer.to_full(shape)
                history.append(_iou(pred, m))
            iter_iou.append(history)
        return point_iou, box_iou, iter_iou


class _BaselineRunner:
    """Prompts objects one by one through the watershed baseline."""

    def __init__(self, baseline: WatershedBaseline):
        self.baseline = baseline

    def set_image(self, image):
        self.baseline.set_image(image)

    def run(self, masks, n_corrections, rng):
        ws = self.baseline
        point_iou, box_iou, iter_iou = [], [], []
        for m in masks:
            pts = [interior_point(m)]
            lbl = [1]
            pred = ws.predict(points=pts, labels=lbl)
            point_iou.append(_iou(pred, m))
            box_iou.append(_iou(ws.predict(box=_box_of(m)), m))
            history = [point_iou[-1]]
            for _ in range(n_corrections):
                nxt = corrective_point(m, pred, rng, "center")
                if nxt is not None:
                    pts.append(nxt[0])
                    lbl.append(nxt[1])
                    pred = ws.predict(points=pts, labels=lbl)
                history.append(_iou(pred, m))
            iter_iou.append(history)
        return point_iou, box_iou, iter_iou


def _runner(method, multimask_point: bool, batch_size: int):
    if isinstance(method, Predictor):
        return _SamRunner(method, multimask_point, batch_size), "sam"
    if isinstance(method, WatershedBaseline):
        return _BaselineRunner(method), "watershed"
    raise ValueError(f"method must be a Predictor (SAM) or a WatershedBaseline, not {type(method).__name__}")


def _summary(point: list, box: list, iterative: list) -> dict:
    it = np.asarray(iterative, dtype=np.float64).reshape(len(iterative), -1) if iterative else np.zeros((0, 1))
    return {
        "objects": len(point),
        "point": float(np.mean(point)) if point else float("nan"),
        "box": float(np.mean(box)) if box else float("nan"),
        "iterative": [float(v) for v in it.mean(axis=0)] if len(it) else [],
    }


def iter_evaluate_prompted(
    pairs,
    method,
    *,
    n_corrections: int = 8,
    max_objects: int | None = None,
    seed: int = 0,
    min_area: int = 1,
    multimask_point: bool = True,
    batch_size: int = 16,
    name: str | None = None,
) -> Generator[EvalProgress, None, dict]:
    """:func:`evaluate_prompted` as a generator: yields after each image, returns the
    results dict."""
    if n_corrections < 0:
        raise ValueError(f"n_corrections must be >= 0, got {n_corrections}")
    if max_objects is not None and max_objects < 1:
        raise ValueError(f"max_objects must be >= 1 or None, got {max_objects}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    runner, default_name = _runner(method, multimask_point, batch_size)
    pairs = load_pairs(pairs)
    rng = np.random.default_rng(seed)
    all_point, all_box, all_iter, per_image = [], [], [], []
    for n, pair in enumerate(pairs, start=1):
        labels = np.asarray(pair.labels)
        if labels.ndim != 2:
            raise ValueError(f"{pair.name}: the prompted evaluation takes 2D label planes, got shape {labels.shape}")
        ids = _object_ids(labels, min_area, max_objects, rng)
        if len(ids):
            runner.set_image(np.asarray(pair.image))
            masks = [labels == i for i in ids]
            point, box, iterative = runner.run(masks, n_corrections, rng)
        else:
            point, box, iterative = [], [], []
        per_image.append({"name": pair.name} | _summary(point, box, iterative))
        all_point += point
        all_box += box
        all_iter += iterative
        yield EvalProgress(n, len(pairs), pair.name)
    return {
        "kind": "prompted",
        "method": name or default_name,
        "images": len(pairs),
        "n_corrections": n_corrections,
        "max_objects": max_objects,
        "seed": seed,
        **_summary(all_point, all_box, all_iter),
        "per_image": per_image,
    }


def evaluate_prompted(pairs, method, **options) -> dict:
    """Mean IoU of prompted segmentation of every ground-truth object.

    Parameters
    ----------
    pairs
        Anything :func:`load_pairs` takes (2D planes).
    method
        A SAM :class:`~napari_sam.core.predictor.Predictor`, or a
        :class:`~napari_sam.core.baseline.WatershedBaseline`.
    n_corrections
        Corrective points after the first point (8, as micro-sam).
    max_objects
        Objects per image, sampled with ``seed``; all when None.
    seed
        Seeds the object sample and the tie-breaking of simulated clicks.
    min_area
        Objects of fewer pixels are skipped.
    multimask_point
        For SAM's single-point prompt, ask for three masks and keep the one with the
        highest predicted IoU (as a user's click is answered); corrections and boxes
        ask for one.
    batch_size
        Objects decoded at once by SAM (full-size masks of this many objects are held).
    name
        Name of the method in the results; ``"sam"`` or ``"watershed"`` by default.

    Returns
    -------
    dict
        ``kind="prompted"``, ``method``, ``images``, ``objects``, ``point``, ``box``
        (mean IoU over all objects), ``iterative`` (mean IoU after 0, 1, ...,
        ``n_corrections`` corrections; entry 0 is the point alone), and ``per_image``
        (the same per image).
    """
    gen = iter_evaluate_prompted(pairs, method, **options)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


# -- automatic -------------------------------------------------------------------------------
def grid_segmenter(model, config=None, **options) -> Callable[[np.ndarray], np.ndarray]:
    """A segmenter for :func:`evaluate_automatic`: SAM's grid mode
    (:func:`~napari_sam.core.automatic.segment_grid`) with ``config`` and ``options``."""
    from .automatic import segment_grid

    return lambda image: segment_grid(image, model, config, **options).labels


def iter_evaluate_automatic(
    pairs, segment: Callable[[np.ndarray], np.ndarray], name: str = "automatic"
) -> Generator[EvalProgress, None, dict]:
    """:func:`evaluate_automatic` as a generator: yields after each image."""
    pairs = load_pairs(pairs)
    per_image = []
    for n, pair in enumerate(pairs, start=1):
        pred = np.asarray(segment(np.asarray(pair.image)))
        if pred.shape != pair.labels.shape:
            raise ValueError(f"{pair.name}: the segmenter returned shape {pred.shape}, expected {pair.labels.shape}")
        per_image.append({"name": pair.name} | instance_scores(pair.labels, pred))
        yield EvalProgress(n, len(pairs), pair.name)
    mean = {
        k: float(np.mean([r[k] for r in per_image])) if per_image else float("nan")
        for k in ("msa", "ap50", "ap75")
    }
    return {"kind": "automatic", "method": name, "images": len(pairs), **mean, "per_image": per_image}


def evaluate_automatic(pairs, segment: Callable[[np.ndarray], np.ndarray], name: str = "automatic") -> dict:
    """Instance segmentation quality of an automatic segmenter.

    Parameters
    ----------
    pairs
        Anything :func:`load_pairs` takes.
    segment
        ``segment(image) -> labels``: an integer label image of the image's (H, W), e.g.
        :func:`grid_segmenter`.
    name
        Name of the method in the results.

    Returns
    -------
    dict
        ``kind="automatic"``, ``method``, ``images``, ``msa``, ``ap50``, ``ap75`` (means
        over images) and ``per_image``.
    """
    gen = iter_evaluate_automatic(pairs, segment, name)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


# -- propagation -----------------------------------------------------------------------------
def evaluate_propagation(
    propagate: Callable[[np.ndarray, int, np.ndarray], np.ndarray],
    volume,
    labels,
    *,
    max_objects: int | None = None,
    seed: int = 0,
    min_area: int = 1,
    name: str = "propagation",
) -> dict:
    """Mean 3D IoU of a mask propagation started from each object's middle plane.

    Parameters
    ----------
    propagate
        ``propagate(volume, start_plane, mask) -> volume_mask``: given the (Z, H, W)
        volume, a plane index and the object's (H, W) mask on that plane, returns the
        object's (Z, H, W) mask.
    volume
        (Z, H, W) image.
    labels
        (Z, H, W) ground-truth instance labels.
    max_objects, seed
        Sample this many objects (all when None).
    min_area
        Objects of fewer voxels are skipped.
    name
        Name of the method in the results.

    Returns
    -------
    dict
        ``kind="propagation"``, ``method``, ``objects``, ``mean_iou`` and
        ``per_object`` (``id``, ``start_plane``, ``iou``).
    """
    volume, labels = np.asarray(volume), np.asarray(labels)
    if labels.ndim != 3 or labels.dtype.kind not in "iub":
        raise ValueError(f"labels must be a (Z, H, W) integer volume, got {labels.dtype} {labels.shape}")
    if volume.shape[:3] != labels.shape:
        raise ValueError(f"volume {volume.shape} and labels {labels.shape} do not cover the same voxels")
    rng = np.random.default_rng(seed)
    ids = _object_ids(labels, min_area, max_objects, rng)
    slices = ndimage.find_objects(labels.astype(np.int64, copy=False))
    per_object = []
    for i in ids:
        sl = slices[int(i) - 1]
        obj = labels == i
        zs = sl[0].start + np.flatnonzero(obj[sl].any(axis=(1, 2)))
        start = int(zs[len(zs) // 2])  # the middle of the planes it occupies
        result = np.asarray(propagate(volume, start, obj[start].copy()))
        if result.shape != labels.shape:
            raise ValueError(f"propagate returned shape {result.shape}, expected {labels.shape}")
        per_object.append({"id": int(i), "start_plane": start, "iou": _iou(result.astype(bool), obj)})
    mean = float(np.mean([r["iou"] for r in per_object])) if per_object else float("nan")
    return {
        "kind": "propagation",
        "method": name,
        "objects": len(per_object),
        "mean_iou": mean,
        "per_object": per_object,
    }


def sam_propagator(model, settings=None) -> Callable[[np.ndarray, int, np.ndarray], np.ndarray]:
    """A ``propagate`` for :func:`evaluate_propagation`: SAM carrying the mask from plane
    to plane (:func:`~napari_sam.core.propagation.propagate` with ``settings``), as the
    plugin propagates. Each volume is embedded once, however many objects it holds."""
    from .embeddings import Embeddings
    from .propagation import PropagationSettings, propagate
    from .tiled_segmentation import PlaneMask

    settings = settings or PropagationSettings()
    held: dict[int, tuple] = {}

    def run(volume: np.ndarray, start: int, mask: np.ndarray) -> np.ndarray:
        if id(volume) not in held:
            held.clear()  # the volume object is kept with its embeddings, so its id stays its own
            held[id(volume)] = (volume, Embeddings(volume, model, cache=False, axes="ZYX"))
        emb = held[id(volume)][1]
        out = np.zeros(volume.shape[:3], bool)
        out[start] = mask
        if mask.sum() < settings.min_area:
            return out  # too small to start from (the plugin refuses it too): the start plane alone
        for step in propagate(emb, start, PlaneMask.from_full(mask), settings=settings):
            if step.mask is not None:
                out[step.plane[0]] = step.mask.to_full(mask.shape)
        return out

    return run


def watershed_propagator(settings=None) -> Callable[[np.ndarray, int, np.ndarray], np.ndarray]:
    """The classical counterpart of :func:`sam_propagator`: on each next plane, the
    seeded watershed baseline answers the previous mask's deepest points and its grown
    box; it stops by the same rules (too small, or too little overlap with the previous
    plane)."""
    from .propagation import PropagationSettings, _prompts
    from .tiled_segmentation import PlaneMask

    settings = settings or PropagationSettings()
    ws = WatershedBaseline()

    def run(volume: np.ndarray, start: int, mask: np.ndarray) -> np.ndarray:
        out = np.zeros(volume.shape[:3], bool)
        out[start] = mask
        for direction in (1, -1):
            previous, z = mask, start + direction
            while 0 <= z < volume.shape[0] and previous.any():
                # the prompts SAM's propagation would send, from the same helper
                prompts = _prompts(PlaneMask.from_full(previous).cropped(), settings, previous.shape)
                ws.set_image(volume[z])
                answer = ws.predict(**prompts)
                if answer.sum() < settings.min_area or _iou(answer, previous) < settings.min_consecutive_iou:
                    break
                out[z] = answer
                previous, z = answer, z + direction
        return out

    return run


# -- reporting -------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if np.isnan(v) else f"{v:.3f}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def format_table(results) -> str:
    """A markdown table (plain text that reads well as is) of one or more results.

    Parameters
    ----------
    results
        A results dict of :func:`evaluate_prompted`, :func:`evaluate_automatic` or
        :func:`evaluate_propagation`, or a list of them (one row per method; one table
        per kind, in the order the kinds first appear).

    Returns
    -------
    str
    """
    results = [results] if isinstance(results, dict) else list(results)
    kinds: dict[str, list[dict]] = {}
    for r in results:
        if not isinstance(r, dict) or r.get("kind") not in ("prompted", "automatic", "propagation"):
            raise ValueError(
                "format_table takes results of evaluate_prompted, evaluate_automatic or evaluate_propagation"
            )
        kinds.setdefault(r["kind"], []).append(r)
    tables = []
    for kind, rs in kinds.items():
        if kind == "prompted":
            n = max(len(r["iterative"]) for r in rs)
            header = ["method", "images", "objects", "point", "box"] + [f"+{k} corr." for k in range(1, n)]
            rows = [[r["method"], r["images"], r["objects"], r["point"], r["box"], *r["iterative"][1:]] for r in rs]
            tables.append("Prompted segmentation: mean IoU per object\n\n" + _table(header, rows))
        elif kind == "automatic":
            rows = [[r["method"], r["images"], r["msa"], r["ap50"], r["ap75"]] for r in rs]
            tables.append(
                "Automatic segmentation (AP = TP / (TP + FP + FN), DSB 2018)\n\n"
                + _table(["method", "images", "mSA", "AP50", "AP75"], rows)
            )
        else:
            rows = [[r["method"], r["objects"], r["mean_iou"]] for r in rs]
            header = ["method", "objects", "mean 3D IoU"]
            tables.append("Propagation: mean 3D IoU per object\n\n" + _table(header, rows))
    return "\n\n".join(tables)
