"""Promptable segmentation of one 2D plane.

:class:`Predictor` holds a model and the embedding of the current plane and answers
prompts given in original-image pixel coordinates. Point coordinates are (x, y), that is
(column, row), as in SAM; boxes are (x0, y0, x1, y1). napari's (row, col) order is
converted in the napari layer, never here.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch.nn import functional as F

from ..model.sam import Sam
from ..model.traced_decode import TracedDecode
from ..model.transformer import ImageContext
from .image_embedding import ImageEmbedding
from .masks import upscale_logits
from .pixel_heads import chooses_masks, reads_pixels, refines_masks
from .prediction import Prediction
from .preprocess import Normalization, prepare_plane
from .prompts import check_boxes, check_points_inside
from .stain import plane_channel

__all__ = ["Prediction", "Predictor"]

_CONTEXTS = 4  # image contexts kept (about 19 MiB each for SAM's 64 x 64 grid)


class Predictor:
    """Answers point, box and mask prompts on one plane at a time.

    Parameters
    ----------
    model
        A :class:`~napari_sam.model.sam.Sam` in evaluation mode (see
        :func:`napari_sam.core.models.load_model`, whose ``dtype`` sets the encoder's
        precision; the decoder always runs in float32: it is cheap, and its thresholds
        are sensitive).
    normalization
        How intensities are brought to SAM's 0-255 range; see
        :class:`~napari_sam.core.preprocess.Normalization`.
    traced
        Answer single prompt sets through traced graphs
        (:class:`~napari_sam.model.traced_decode.TracedDecode`): the same numbers, but
        a click computed in a worker thread no longer waits on the GUI thread for the
        interpreter lock between operations. The first prompt of each kind traces its
        graph (about 0.3 s; :meth:`warm_up` does it ahead). Batches run eagerly. Image
        contexts are kept for the last few embeddings set: after changing the model's
        weights, set the embedding again after :meth:`reset_image`.

    Examples
    --------
    >>> predictor = Predictor(load_model("vit_b"))            # doctest: +SKIP
    >>> predictor.set_image(nuclei)                           # doctest: +SKIP
    >>> result = predictor.predict(points=[[120, 85]], labels=[1])  # doctest: +SKIP
    >>> mask = result.best_mask()                             # doctest: +SKIP
    """

    def __init__(self, model: Sam, normalization: Normalization = Normalization(), traced: bool = True):
        self.model = model.eval()
        self.normalization = normalization
        self._embedding: ImageEmbedding | None = None
        self._context: ImageContext | None = None
        # The current image's model input, for a model whose mask refiner reads the pixels.
        self._pixels: torch.Tensor | None = None
        self._refine = self._choose = False
        self._traced = TracedDecode(self.model) if traced else None
        # Recent (embedding, image context) pairs: tiled answers switch between a few
        # tiles, and the context is the costly part of setting an embedding.
        self._contexts: OrderedDict[int, tuple[ImageEmbedding, ImageEmbedding, ImageContext]] = OrderedDict()

    # -- the image ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def low_res_size(self) -> int:
        """Side of the low-res logits (and of ``mask_input``): 4x the embedding grid,
        256 for SAM's 1024-pixel input."""
        return 4 * self.model.config.embedding_size

    @property
    def embedding(self) -> ImageEmbedding | None:
        """The embedding prompts are answered on, or None before an image is set."""
        return self._embedding

    @torch.inference_mode()
    def compute_embedding(self, x: torch.Tensor, original_size: tuple[int, int]) -> ImageEmbedding:
        """Embed a resized (1, 3, h, w) float tensor in [0, 255] whose longest side is the
        model's input size, without making it the current image."""
        size = self.model.config.image_size
        if x.ndim != 4 or x.shape[:2] != (1, 3) or max(x.shape[-2:]) != size:
            raise ValueError(f"model input must be (1, 3, h, w) with longest side {size}, got {tuple(x.shape)}")
        features = self.model.embed(x.to(self.device, torch.float32))
        return ImageEmbedding(features, (int(x.shape[-2]), int(x.shape[-1])),
                              (int(original_size[0]), int(original_size[1])))

    def embed_image(
        self,
        image: np.ndarray,
        channel_axis: int | None = None,
        channel: int | str | None = None,
        limits: tuple[float, float] | None = None,
    ) -> ImageEmbedding:
        """Embed a plane without making it the current image (see :meth:`set_image`)."""
        x, original_size = prepare_plane(
            image, self.normalization, channel_axis, channel, limits, self.model.config.image_size
        )
        return self.compute_embedding(x, original_size)

    def model_input(self, image: np.ndarray, limits: tuple[float, float] | None = None) -> torch.Tensor:
        """(1, 3, S, S) float32: the plane as :meth:`embed_image` gives it to the image
        encoder (resized, normalised by the model's pixel statistics, zero-padded to the
        square input); instance decoders that refine their maps by the image read it."""
        x, _ = prepare_plane(image, self.normalization, None, None, limits, self.model.config.image_size)
        return self.model.preprocess(x.to(self.device, torch.float32))

    def set_image(
        self,
        image: np.ndarray,
        channel_axis: int | None = None,
        channel: int | str | None = None,
        limits: tuple[float, float] | None = None,
    ) -> ImageEmbedding:
        """Embed a plane and answer later prompts on it.

        Parameters
        ----------
        image
            (H, W) grayscale, (H, W, 3|4) RGB(A), or multichannel with ``channel_axis`` and
            ``channel``. Any integer or float dtype.
        channel_axis, channel
            See :func:`~napari_sam.core.preprocess.to_rgb`. An RGB plane without a
            channel follows the model's stain advice (:func:`~napari_sam.core.stain.channel_for`)
            unless fixed limits are given (they are in the colours' units);
            :meth:`embed_image` takes the channel as given.
        limits
            Fixed (lower, upper) intensity limits, e.g. statistics of the whole volume;
            overrides the percentiles of this plane.

        Returns
        -------
        ImageEmbedding
            Also kept as :attr:`embedding`; store it to skip the encoder next time.
        """
        image = np.asarray(image)
        if limits is None and self.normalization.mode != "fixed":  # fixed limits are in the colours' units
            channel = plane_channel(self.model, image, channel_axis, channel)
        x, original_size = prepare_plane(
            image, self.normalization, channel_axis, channel, limits, self.model.config.image_size
        )
        return self.set_embedding(self.compute_embedding(x, original_size), self._refiner_input(x, channel),
                                  refine=refines_masks(self.model, channel), choose=chooses_masks(self.model, channel))

    def _refiner_input(self, x: torch.Tensor, channel=None) -> torch.Tensor | None:
        """The model input that a mask refiner or chooser reads, for a resized (1, 3, h, w) plane."""
        if not reads_pixels(self.model, channel):
            return None
        with torch.inference_mode():
            return self.model.preprocess(x.to(self.device, torch.float32))

    def set_model_input(self, image: np.ndarray, original_size: tuple[int, int]) -> ImageEmbedding:
        """Embed an image already resized to the model input (h, w, 3), values 0-255, whose
        original size was ``original_size``. This mirrors the official ``set_torch_image``."""
        x = torch.as_tensor(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
        return self.set_embedding(self.compute_embedding(x, original_size), self._refiner_input(x))

    @torch.inference_mode()
    def set_embedding(self, embedding: ImageEmbedding, pixels: torch.Tensor | None = None,
                      refine: bool = True, choose: bool = True) -> ImageEmbedding:
        """Answer later prompts on a previously computed embedding.

        ``pixels``: the (1, 3, S, S) model input it was computed from (:meth:`model_input`),
        for a model with a mask refiner (:attr:`Sam.mask_refiner
        <napari_sam.model.sam.Sam.mask_refiner>`) to sharpen the masks by, unless
        ``refine`` is False, and for its mask chooser to rank a lone click's masks by
        (:func:`chooses_masks`), unless ``choose`` is False; without them the masks are SAM's enlarged logits, ranked by
        its IoU head."""
        side = self.model.config.image_size
        if max(embedding.input_size) != side:
            # Prompts would be mapped into another frame than the features': silently empty masks.
            raise ValueError(f"this embedding was made for a {max(embedding.input_size)}-pixel model input; "
                             f"the model takes {side} (ImageEmbedding.from_array(..., long_side={side}))")
        self._pixels = pixels
        self._refine = refine and pixels is not None and self.model.mask_refiner is not None
        self._choose = choose and pixels is not None and chooses_masks(self.model)
        known = self._contexts.get(id(embedding))
        if known is not None and known[0] is embedding:
            self._contexts.move_to_end(id(embedding))
            _, self._embedding, self._context = known
            return self._embedding
        features = embedding.features.to(self.device, torch.float32)
        self._embedding = ImageEmbedding(features, embedding.input_size, embedding.original_size)
        self._context = self._traced.image_context(features) if self._traced else self.model.image_context(features)
        # The entry holds the embedding itself, so its id cannot be reused while cached.
        self._contexts[id(embedding)] = (embedding, self._embedding, self._context)
        while len(self._contexts) > _CONTEXTS:
            self._contexts.popitem(last=False)
        return self._embedding

    def warm_up(self) -> None:
        """Trace the graphs of the usual interactive prompts (a point with three masks, a
        point with one, a correcting point with the previous answer, a box) on a blank
        embedding, so that the first real click does not wait for them (about 1 s on a
        2-core CPU). Forgets the current image."""
        if self._traced is None:
            return
        cfg = self.model.config
        side = cfg.image_size
        blank = torch.zeros(1, cfg.prompt_embed_dim, cfg.embedding_size, cfg.embedding_size, device=self.device)
        self.set_embedding(ImageEmbedding(blank, (side, side), (side, side)))
        centre = [[side / 2, side / 2]]
        for multimask in (True, False):
            self.predict(points=centre, multimask=multimask)
        self.predict(points=centre, mask_input=np.zeros((self.low_res_size,) * 2, np.float32), multimask=False)
        self.predict(box=[0, 0, side / 2, side / 2], multimask=False)
        self.reset_image()

    def reset_image(self) -> None:
        """Forget the current image."""
        self._embedding = None
        self._context = None
        self._pixels = None
        self._contexts.clear()

    # -- prompts -----------------------------------------------------------------------
    def predict(
        self,
        points=None,
        labels=None,
        box=None,
        mask_input=None,
        multimask: bool = True,
        return_logits: bool = False,
    ) -> Prediction:
        """Masks for one prompt set.

        Parameters
        ----------
        points
            (N, 2) array of (x, y) pixel coordinates in the original plane.
        labels
            (N,) 1 for foreground, 0 for background; all foreground when omitted.
        box
            (x0, y0, x1, y1) in original pixels. A box reaching past the border is clipped
            to the plane; one entirely outside is an error.
        mask_input
            (256, 256) or (1, 256, 256) low-res logits, e.g. ``prompt_logits[best]`` of an
            earlier prediction.
        multimask
            Three masks for an ambiguous prompt (a single point) instead of one.
        return_logits
            Return float logits instead of boolean masks.

        Returns
        -------
        Prediction
            (C, H, W) masks, (C,) predicted IoU, (C, 256, 256) low-res logits; C = 3 or 1.
        """
        pts = None if points is None else np.asarray(points, dtype=np.float64).reshape(1, -1, 2)
        lbl = None if labels is None else np.asarray(labels).reshape(1, -1)
        bx = None if box is None else np.asarray(box, dtype=np.float64).reshape(1, 4)
        side = self.low_res_size
        mi = None if mask_input is None else np.asarray(mask_input, dtype=np.float32).reshape(1, 1, side, side)
        return self.predict_batch(pts, lbl, bx, mi, multimask, return_logits)[0]

    @torch.inference_mode()
    def predict_batch(
        self,
        points=None,
        labels=None,
        boxes=None,
        mask_input=None,
        multimask: bool = False,
        return_logits: bool = False,
    ) -> Prediction:
        """Masks for B prompt sets at once (for example one box per object).

        Parameters
        ----------
        points
            (B, N, 2) as (x, y) original pixels, or None.
        labels
            (B, N), or None for all foreground.
        boxes
            (B, 4) as (x0, y0, x1, y1), or None.
        mask_input
            (B, 1, 256, 256) low-res logits, or None.
        multimask, return_logits
            As in :meth:`predict`.

        Returns
        -------
        Prediction
            (B, C, H, W) masks, (B, C) IoU, (B, C, 256, 256) low-res logits.
        """
        emb = self._require_embedding()
        H, W = emb.original_size
        h, w = emb.input_size
        scale = np.array([w / W, h / H])
        if points is None and boxes is None and mask_input is None:
            raise ValueError("empty prompt: give at least one point, a box or a mask input")
        t_points = t_labels = t_boxes = t_mask = None
        batch = []
        if points is not None:
            pts = np.asarray(points, dtype=np.float64)
            if pts.ndim != 3 or pts.shape[-1] != 2 or pts.shape[1] == 0:
                raise ValueError(f"points must have shape (B, N, 2) with N >= 1, got {pts.shape}")
            check_points_inside(pts.reshape(-1, 2), H, W)
            lbl = np.ones(pts.shape[:2], np.int64) if labels is None else np.asarray(labels)
            if lbl.shape != pts.shape[:2]:
                raise ValueError(f"labels have shape {lbl.shape}, expected {pts.shape[:2]} to match the points")
            if not np.isin(lbl, (0, 1)).all():
                raise ValueError(f"point labels must be 1 (foreground) or 0 (background), got {np.unique(lbl)}")
            t_points = torch.as_tensor(pts * scale, dtype=torch.float32, device=self.device)
            t_labels = torch.as_tensor(lbl.astype(np.int64), device=self.device)
            batch.append(pts.shape[0])
        if boxes is not None:
            bxs = check_boxes(np.asarray(boxes, dtype=np.float64), H, W)
            t_boxes = torch.as_tensor(bxs * np.tile(scale, 2), dtype=torch.float32, device=self.device)
            batch.append(bxs.shape[0])
        if mask_input is not None:
            m = np.asarray(mask_input, dtype=np.float32)
            side = self.low_res_size
            if m.ndim != 4 or m.shape[1:] != (1, side, side):
                raise ValueError(f"mask_input must have shape (B, 1, {side}, {side}), got {m.shape}")
            t_mask = torch.as_tensor(m, device=self.device)
            batch.append(m.shape[0])
        if len(set(batch)) > 1:
            raise ValueError(f"points, boxes and mask_input disagree on the batch size: {batch}")

        if self._traced is not None:
            assert self._context is not None, "set_embedding() makes the context with the embedding"
            low, iou = self._traced(t_points, t_labels, t_boxes, multimask, self._context, t_mask, emb.features)
        else:
            low, iou = self.model.decode(
                emb.features, t_points, t_labels, t_boxes, t_mask, multimask_output=multimask, context=self._context
            )
        refiner = self.model.mask_refiner
        chooser = refiner.chooser if self._choose and refiner is not None else None
        if (chooser is not None and self._pixels is not None and multimask and t_points is not None
                and t_labels is not None and t_points.shape[1] == 1 and t_boxes is None and t_mask is None
                and bool((t_labels == 1).all())):
            # a lone click: its three masks ranked by looking at them (model.mask_chooser)
            iou = chooser.estimate(low.float(), self._pixels.to(self.device), t_points[:, 0], iou)
        # Only a first answer is refined: the refiner does not see the clicks, so where it
        # carried a mask into a touching neighbour, a background click there would not
        # take it back (measured: crowded nuclei lost up to 0.5 IoU after 4 corrections).
        pixels = self._pixels if t_mask is None and self._refine else None
        return Prediction(iou.cpu().numpy(), low.cpu().numpy(), self._upscaler(emb, pixels), return_logits,
                          None if pixels is None else self._refined_low_res(pixels))

    def _refined_low_res(self, pixels: torch.Tensor):
        refiner = self.model.mask_refiner
        assert refiner is not None, "pixels are kept only for a model with a mask refiner"

        @torch.inference_mode()
        def refine(low: np.ndarray) -> np.ndarray:
            side = low.shape[-1]
            t = torch.from_numpy(low).reshape(-1, 1, side, side).to(self.device)
            full = refiner.refine_low_res(t.float(), pixels.to(self.device).float())
            pooled = F.avg_pool2d(full, full.shape[-1] // side)
            return pooled.reshape(low.shape).cpu().numpy()

        return refine

    def _upscaler(self, emb: ImageEmbedding, pixels: torch.Tensor | None = None):
        model = self.model

        @torch.inference_mode()
        def upscale(low: np.ndarray, return_logits: bool) -> np.ndarray:
            full = upscale_logits(model, torch.from_numpy(low), emb.input_size, emb.original_size, pixels)
            return (full if return_logits else full > model.mask_threshold).cpu().numpy()

        return upscale

    def _require_embedding(self) -> ImageEmbedding:
        if self._embedding is None:
            raise RuntimeError("no image is set: call set_image() or set_embedding() before predicting")
        return self._embedding
