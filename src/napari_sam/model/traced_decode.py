"""The prompt-to-mask step as traced TorchScript graphs, which run without the GIL.

An interactive click runs the prompt encoder and the mask decoder: a couple of hundred
small tensor operations. Called from Python, each one gives the interpreter lock back
and has to win it again. That costs nothing while the caller is alone, but a viewer
answers clicks in a worker thread while its GUI thread is busy in Python (drawing the
point just placed), and then every handover waits on the other thread: measured on a
2-core machine, a 9 ms decode took 1.2 s beside a busy Python thread. A traced graph
runs all of its operations in one call with the lock released (59 ms in the same test,
the rest being the CPU shared with that thread).

Tracing records one path through the code, so a graph is made for each combination of
what varies that way: which prompt kinds are present and ``multimask``. The number of
points stays free. Batches of several prompt sets (automatic modes), prompts with a mask
input, and anything that fails to trace take the ordinary eager route.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .transformer import ImageContext

__all__ = ["TracedDecode"]

_CONTEXT_FIELDS = ("keys", "key_pe", "keys_pe", "t2i_k", "t2i_v", "i2t_q")


class _Decode(nn.Module):
    """:meth:`Sam.decode` with a cached image context, over plain tensor arguments."""

    def __init__(self, sam: nn.Module, has_points: bool, has_boxes: bool, multimask: bool):
        super().__init__()
        self.sam = sam
        self.has_points, self.has_boxes, self.multimask = has_points, has_boxes, multimask

    def forward(self, coords, labels, boxes, keys, key_pe, keys_pe, t2i_k, t2i_v, i2t_q):
        context = ImageContext(keys, key_pe, keys_pe, t2i_k, t2i_v, i2t_q)
        return self.sam.decode(
            None,
            coords if self.has_points else None,
            labels if self.has_points else None,
            boxes if self.has_boxes else None,
            None,
            multimask_output=self.multimask,
            context=context,
        )


class _Context(nn.Module):
    """:meth:`Sam.image_context` as a tuple of tensors."""

    def __init__(self, sam: nn.Module):
        super().__init__()
        self.sam = sam

    def forward(self, embedding):
        context = self.sam.image_context(embedding)
        return tuple(getattr(context, f) for f in _CONTEXT_FIELDS)


class TracedDecode:
    """Answers prompts on a cached image context through traced graphs.

    Parameters
    ----------
    sam
        The model; the graphs share its parameters, so in-place weight updates (training,
        ``load_state_dict``) reach them.

    Examples
    --------
    >>> decode = TracedDecode(sam)                                   # doctest: +SKIP
    >>> low_res, iou = decode(coords, labels, None, True, context)   # doctest: +SKIP
    """

    def __init__(self, sam: nn.Module):
        self.sam = sam
        self.enabled = True
        self._graphs: dict[tuple, torch.jit.ScriptModule] = {}

    def __call__(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        multimask: bool,
        context: ImageContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (B, C, h, w) and IoU predictions (B, C), as :meth:`Sam.decode`
        with ``context`` and no mask input gives them."""
        has_points, has_boxes = point_coords is not None, boxes is not None
        batch = point_coords.shape[0] if has_points else boxes.shape[0]
        device = context.keys.device
        coords = point_coords if has_points else torch.zeros(batch, 1, 2, device=device)
        labels = point_labels if has_points else torch.ones(batch, 1, dtype=torch.long, device=device)
        bxs = boxes if has_boxes else torch.zeros(batch, 4, device=device)
        args = (coords, labels, bxs, *(getattr(context, f) for f in _CONTEXT_FIELDS))
        key = (batch, has_points, has_boxes, bool(multimask), device.type, context.keys.dtype)
        # Only single prompt sets (clicks) are traced: a batch's few large operations
        # hardly wait on the lock, and each new batch size would cost a trace (one more
        # decode of the whole batch).
        traceable = self.enabled and batch == 1
        graph = self._graphs.get(key) if traceable else None
        if graph is None and traceable:
            graph = self._trace(key, args)
        if graph is None:
            return _Decode(self.sam, has_points, has_boxes, bool(multimask))(*args)
        # The profiling executor would re-optimise each new point count for ~100 ms;
        # the plain interpreter runs these graphs as fast.
        with torch.jit.optimized_execution(False):
            return graph(*args)

    def image_context(self, embedding: torch.Tensor) -> ImageContext:
        """:meth:`Sam.image_context`, which runs whenever the prompts move to another tile."""
        key = ("context", tuple(embedding.shape), embedding.device.type, embedding.dtype)
        graph = self._graphs.get(key) if self.enabled else None
        if graph is None and self.enabled:
            graph = self._trace(key, (embedding,), _Context(self.sam))
        if graph is None:
            return self.sam.image_context(embedding)
        with torch.jit.optimized_execution(False):
            return ImageContext(*graph(embedding))

    def _trace(self, key: tuple, args: tuple, module: nn.Module | None = None) -> torch.jit.ScriptModule | None:
        if module is None:
            _, has_points, has_boxes, multimask = key[:4]
            module = _Decode(self.sam, has_points, has_boxes, multimask)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                # The batch size becomes a constant, as intended: it is part of the key.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                # torch marks tracing as deprecated in favour of torch.compile/export,
                # which need a compiler or give no GIL-free call; should tracing go
                # away, the except below falls back to eager decoding.
                warnings.simplefilter("ignore", DeprecationWarning)
                graph = torch.jit.trace(module, args, check_trace=False)
        except Exception as err:  # noqa: BLE001 - any failure means: decode eagerly
            warnings.warn(f"decoding eagerly: the decoder could not be traced ({err})", RuntimeWarning, stacklevel=3)
            self.enabled = False
            return None
        self._graphs[key] = graph
        return graph
