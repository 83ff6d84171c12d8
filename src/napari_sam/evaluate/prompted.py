"""Prompted segmentation quality: every ground-truth object (or a seeded sample of
them) prompted the way the SAM paper and micro-sam evaluate interactive segmentation.

Each object gets one point (its pixel farthest from its boundary), its bounding box, and
iterative correction starting from the point, each step adding one point in the largest
error region (foreground where the object was missed, background where the mask spilled
over) and, for SAM, passing the previous low-res logits as the mask input; a correction
whose single mask leaves a click on the wrong side is answered as the Annotator answers it
(:func:`~napari_sam.core.honoured_clicks.honouring_choice`). The result
is the mean IoU per prompt type and after each correction. It runs with a SAM
:class:`~napari_sam.core.predictor.Predictor` or with the classical
:class:`~napari_sam.evaluate.baseline.WatershedBaseline` (whose corrective points become
markers), so every number for SAM comes with the baseline's. A plane larger than the
model input is answered as the plugin answers it: object by object through
:meth:`~napari_sam.core.embeddings.Embeddings.segment` on full-resolution tiles
(corrections send all points and the previous answer as mask prompt, as the viewer
does), not shrunk to the input.

On CPU, ``max_objects`` samples a fixed number of objects per image (with a seed) to
keep the evaluation affordable.
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np

from ..core.honoured_clicks import honouring_choice
from ..core.masks import drop_fragments, iou, prompt_box
from ..core.object_scale import answers_per_object, segment_at_object_scale
from ..core.predictor import Predictor
from ..core.prompt_simulation import corrective_point, interior_point
from ..core.prompts import Prompt
from ..core.scale import magnification_for
from ..core.tiled_segmentation import LazyMasks
from ..core.tiling import default_tiling
from .baseline import WatershedBaseline
from .data import load_pairs, sample_objects
from .progress import EvalProgress, run_to_end

__all__ = ["evaluate_prompted", "iter_evaluate_prompted"]


class _SamRunner:
    """Prompts a batch of objects of one image through a SAM predictor."""

    def __init__(self, predictor: Predictor, multimask_point: bool, batch_size: int, refine: bool = True,
                 magnification: float | str | None = None, diameter: float | None = None, channel=None):
        self.predictor = predictor
        self.channel = channel
        self.multimask_point = multimask_point
        self.batch_size = batch_size
        self.refine = refine
        self.magnification = magnification
        self.diameter = diameter
        self.tiles = None
        self.chosen: float | None = None

    def set_image(self, image):
        image = np.asarray(image)
        self.tiles = None
        model = self.predictor.model
        self.chosen = magnification_for(model, image, self.magnification, self.diameter)
        tile, halo = default_tiling(model.config.image_size, self.chosen)
        per_object = answers_per_object(model) and self.magnification in (None, "auto")
        if max(image.shape[:2]) > tile + 2 * halo or per_object:
            # Larger than a tile: measure what the plugin does with such a plane (tiles
            # at the chosen magnification, objects merged across tiles), not a shrunken
            # whole plane. A model with per-object scale advice goes this way on planes
            # of one tile too: the Annotator answers all its prompts through those rules,
            # and what they do there is what users meet.
            from ..core.embeddings import Embeddings

            axes = "YX" if image.ndim == 2 else "YXC"
            # Chosen again by the embeddings, as the plugin's are, so that the model's
            # per-object advice applies where the magnification is the model's choice.
            self.tiles = Embeddings(
                image, model, cache=False, axes=axes, channel=self.channel, normalization=self.predictor.normalization,
                statistics="plane", magnification=self.magnification, diameter=self.diameter,
            )
            self.chosen = self.tiles.magnification
        else:
            self.predictor.set_image(image, channel=self.channel)

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
        # Specks are dropped as the plugin drops them from a click's answer (segment_tiled).
        pred = np.stack([drop_fragments(m, p) for m, p in zip(first.best_mask(), points)])
        low = first.prompt_logits[rows, best]
        point_iou = [iou(pred[i], masks[i], empty=1.0) for i in range(B)]
        boxes = np.stack([prompt_box(m) for m in masks])
        box_pred = [drop_fragments(m) for m in pr.predict_batch(boxes=boxes, multimask=False).best_mask()]
        box_iou = [iou(box_pred[i], masks[i], empty=1.0) for i in range(B)]
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
                answers, new_low = out.best_mask(), out.prompt_logits[:, 0]
                for i in np.flatnonzero(~done):
                    self._honour(i, points, labels, low, answers, new_low)
                new_pred = np.stack([drop_fragments(m, p, lb) for m, p, lb in zip(answers, points, labels)])
                pred = np.where(done[:, None, None], pred, new_pred)
                low = np.where(done[:, None, None], low, new_low)
            history.append([iou(pred[i], masks[i], empty=1.0) for i in range(B)])
        return point_iou, box_iou, [list(x) for x in zip(*history)]

    def _honour(self, i: int, points, labels, low, answers, new_low) -> None:
        # As the Annotator answers a correction (segment_tiled): where the single mask
        # leaves a click on the wrong side, the most likely mask that honours them all.
        def ask():
            again = self.predictor.predict_batch(points=points[i : i + 1], labels=labels[i : i + 1],
                                                 mask_input=low[i : i + 1, None], multimask=True)[0]
            return LazyMasks(again), again.iou

        choice = honouring_choice(answers[i], ask, points[i], labels[i], max(answers[i].shape) / low.shape[-1])
        if choice is not None:
            chosen, k, _ = choice
            answers[i], new_low[i] = chosen[k], chosen.low_res_logits[k]

    def _tiled(self, masks, n_corrections, rng):
        # One object at a time, as a click in the viewer is answered: through the
        # Annotator's rule (segment_at_object_scale: a box, and a click's corrections, at
        # the object's own scale); corrections send all points and the previous answer's
        # logits.
        emb = self.tiles
        shape = masks[0].shape
        point_iou, box_iou, iter_iou = [], [], []
        for m in masks:
            pts, lbl = [interior_point(m)], [1]
            answer = segment_at_object_scale(emb, 0, Prompt.make(pts, lbl), self.multimask_point)
            pred = answer.to_full(shape)
            point_iou.append(iou(pred, m, empty=1.0))
            box = segment_at_object_scale(emb, 0, Prompt.make(box=prompt_box(m)), False)
            box_iou.append(iou(box.to_full(shape), m, empty=1.0))
            history = [point_iou[-1]]
            for _ in range(n_corrections):
                nxt = corrective_point(m, pred, rng, "center")
                if nxt is not None:
                    pts.append(nxt[0])
                    lbl.append(int(nxt[1]))
                    previous = answer if self.refine else None
                    answer = segment_at_object_scale(emb, 0, Prompt.make(pts, lbl, previous=previous), False)
                    pred = answer.to_full(shape)
                history.append(iou(pred, m, empty=1.0))
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
            point_iou.append(iou(pred, m, empty=1.0))
            box_iou.append(iou(ws.predict(box=prompt_box(m)), m, empty=1.0))
            history = [point_iou[-1]]
            for _ in range(n_corrections):
                nxt = corrective_point(m, pred, rng, "center")
                if nxt is not None:
                    pts.append(nxt[0])
                    lbl.append(nxt[1])
                    pred = ws.predict(points=pts, labels=lbl)
                history.append(iou(pred, m, empty=1.0))
            iter_iou.append(history)
        return point_iou, box_iou, iter_iou


def _runner(method, multimask_point: bool, batch_size: int, magnification=None, diameter=None, channel=None):
    if isinstance(method, Predictor):
        return _SamRunner(method, multimask_point, batch_size, magnification=magnification, diameter=diameter,
                          channel=channel), "sam"
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
    magnification: float | str | None = None,
    diameter: float | None = None,
    channel: str | None = None,
) -> Generator[EvalProgress, None, dict]:
    """:func:`evaluate_prompted` as a generator: yields after each image, returns the
    results dict."""
    if n_corrections < 0:
        raise ValueError(f"n_corrections must be >= 0, got {n_corrections}")
    if max_objects is not None and max_objects < 1:
        raise ValueError(f"max_objects must be >= 1 or None, got {max_objects}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    runner, default_name = _runner(method, multimask_point, batch_size, magnification, diameter, channel)
    pairs = load_pairs(pairs)
    rng = np.random.default_rng(seed)
    all_point, all_box, all_iter, per_image = [], [], [], []
    for n, pair in enumerate(pairs, start=1):
        labels = np.asarray(pair.labels)
        if labels.ndim != 2:
            raise ValueError(f"{pair.name}: the prompted evaluation takes 2D label planes, got shape {labels.shape}")
        # Each image's sample from its own stream: drawn from the clicks' stream, it
        # would depend on how many corrections the earlier images took, so that two
        # methods (or a model and the baseline) were measured on different objects.
        ids = sample_objects(labels, min_area, max_objects, np.random.default_rng([seed, n]))
        if len(ids):
            runner.set_image(np.asarray(pair.image))
            masks = [labels == i for i in ids]
            point, box, iterative = runner.run(masks, n_corrections, rng)
        else:
            point, box, iterative = [], [], []
        scale = {"magnification": runner.chosen} if getattr(runner, "chosen", None) else {}
        per_image.append({"name": pair.name} | scale | _summary(point, box, iterative))
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
        Anything :func:`~napari_sam.evaluate.data.load_pairs` takes (2D planes).
    method
        A SAM :class:`~napari_sam.core.predictor.Predictor`, or a
        :class:`~napari_sam.evaluate.baseline.WatershedBaseline`.
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
    magnification
        SAM only: the magnification planes are embedded at
        (:func:`~napari_sam.core.scale.magnification_for`; None: the model's advice);
        the one chosen for each image is in ``per_image``.
    diameter
        SAM only: the objects' diameter in pixels, for a magnification chosen from it
        (None: estimated per image).
    channel
        SAM only: how RGB planes are read, ``"rgb"`` (the colours) or ``"haematoxylin"``
        (:mod:`~napari_sam.core.stain`); None: as the model advises.

    Returns
    -------
    dict
        ``kind="prompted"``, ``method``, ``images``, ``objects``, ``point``, ``box``
        (mean IoU over all objects), ``iterative`` (mean IoU after 0, 1, ...,
        ``n_corrections`` corrections; entry 0 is the point alone), and ``per_image``
        (the same per image).
    """
    return run_to_end(iter_evaluate_prompted(pairs, method, **options))
