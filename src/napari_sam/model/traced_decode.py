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
what varies that way: which prompt kinds are present, whether a mask prompt (the previous
answer, when a click corrects it) comes along, and ``multimask``. The number of points
stays free. Batches of several prompt sets (automatic modes) and anything that fails to
trace take the ordinary eager route.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import matmul
from .transformer import ImageContext

if TYPE_CHECKING:
    from .sam import Sam

__all__ = ["TracedDecode"]

_CONTEXT_FIELDS = ("keys", "key_pe", "keys_pe", "t2i_k", "t2i_v", "i2t_q")


class _Decode(nn.Module):
    """:meth:`Sam.decode` over plain tensor arguments, with the cached image context (and,
    for a mask prompt, the embedding, whose image side the mask changes)."""

    def __init__(self, sam: Sam, has_points: bool, has_boxes: bool, has_mask: bool, multimask: bool):
        super().__init__()
        self.sam = sam
        self.has_points, self.has_boxes, self.has_mask, self.multimask = has_points, has_boxes, has_mask, multimask

    def forward(self, coords, labels, boxes, embedding, mask, keys, key_pe, keys_pe, t2i_k, t2i_v, i2t_q):
        context = ImageContext(keys, key_pe, keys_pe, t2i_k, t2i_v, i2t_q)
        return self.sam.decode(
            embedding,
            coords if self.has_points else None,
            labels if self.has_points else None,
            boxes if self.has_boxes else None,
            mask if self.has_mask else None,
            multimask_output=self.multimask,
            context=context,
        )


class _Context(nn.Module):
    """:meth:`Sam.image_context` as a tuple of tensors."""

    def __init__(self, sam: Sam):
        super().__init__()
        self.sam = sam

    def forward(self, embedding):
        context = self.sam.image_context(embedding)
        return tuple(getattr(context, f) for f in _CONTEXT_FIELDS)


class TracedDecode:
    """Answers single prompt sets through traced graphs of the decoder.

    Parameters
    ----------
    sam
        The model. The graphs share its parameters, so in-place weight updates
        (training, ``load_state_dict``) reach them; image contexts computed before such
        an update do not change (compute them again).

    Examples
    --------
    >>> decode = TracedDecode(sam)                                          # doctest: +SKIP
    >>> context = decode.image_context(embedding)                           # doctest: +SKIP
    >>> low_res, iou = decode(coords, labels, None, True, context)          # doctest: +SKIP
    """

    def __init__(self, sam: Sam):
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
        mask_input: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode prompts as :meth:`Sam.decode` does.

        Parameters
        ----------
        point_coords, point_labels
            (B, N, 2) points in the model-input frame and their (B, N) labels, or None.
        boxes
            (B, 4) boxes in the model-input frame, or None.
        multimask
            Three masks per prompt set instead of one.
        context
            :meth:`image_context` of the embedding.
        mask_input
            (B, 1, h, w) low-res logits of an earlier answer, or None.
        embedding
            (1, C, h, w) image embedding; needed with ``mask_input``.

        Returns
        -------
        low_res_logits : torch.Tensor
            (B, C, h, w).
        iou_predictions : torch.Tensor
            (B, C).
        """
        has_points, has_boxes, has_mask = point_coords is not None, boxes is not None, mask_input is not None
        if has_mask and embedding is None:
            raise ValueError("a mask prompt needs the embedding it refines")
        if point_coords is not None:
            batch = point_coords.shape[0]
        elif boxes is not None:
            batch = boxes.shape[0]
        elif mask_input is not None:
            batch = mask_input.shape[0]
        else:
            raise ValueError("nothing to decode: give points, boxes or a mask prompt")
        device = context.keys.device
        # Unused inputs still need a tensor in the graph's signature.
        blank = context.keys.new_zeros(())
        args = (
            point_coords if has_points else context.keys.new_zeros(batch, 1, 2),
            point_labels if has_points else torch.ones(batch, 1, dtype=torch.long, device=device),
            boxes if has_boxes else context.keys.new_zeros(batch, 4),
            embedding if has_mask else blank,
            mask_input if has_mask else blank,
            *(getattr(context, f) for f in _CONTEXT_FIELDS),
        )
        flags = (has_points, has_boxes, has_mask, bool(multimask))
        key = (batch, *flags, str(device), context.keys.dtype)
        # Only single prompt sets (clicks) are traced: a batch's few large operations
        # hardly wait on the lock, and each new batch size would cost a trace (one more
        # decode of the whole batch).
        traceable = self.enabled and batch == 1
        graph = self._graphs.get(key) if traceable else None
        if graph is None and traceable:
            graph = self._trace(key, args, _Decode(self.sam, *flags))
        if graph is None:
            return _Decode(self.sam, *flags)(*args)
        # The profiling executor would re-optimise each new point count for ~100 ms;
        # the plain interpreter runs these graphs as fast.
        with torch.jit.optimized_execution(False):
            return graph(*args)

    def image_context(self, embedding: torch.Tensor) -> ImageContext:
        """:meth:`Sam.image_context` (the prompt-independent image side of the first
        decoder layer), which runs whenever the prompts move to another tile.

        Parameters
        ----------
        embedding
            (1, C, h, w) image embedding.

        Returns
        -------
        ImageContext
        """
        key = ("context", tuple(embedding.shape), str(embedding.device), embedding.dtype)
        graph = self._graphs.get(key) if self.enabled else None
        if graph is None and self.enabled:
            graph = self._trace(key, (embedding,), _Context(self.sam))
        if graph is None:
            return self.sam.image_context(embedding)
        with torch.jit.optimized_execution(False):
            return ImageContext(*graph(embedding))

    def _trace(self, key: tuple, args: tuple, module: nn.Module) -> torch.jit.ScriptModule | None:
        matmul.available()  # settle the oneDNN route before recording, not during
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
