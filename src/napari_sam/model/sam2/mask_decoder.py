"""SAM 2's mask decoder: SAM's decoder plus high-resolution skips, an object-score head
and the dynamic fallback from an unstable single mask to the best of the three.

The two-way transformer, hypernetwork MLPs, IoU head and upscaling are SAM's
(:mod:`napari_sam.model.mask_decoder`, :mod:`napari_sam.model.transformer`); SAM 2 names
the transformer's token MLP ``mlp.layers.{0,1}`` where SAM says ``mlp.lin1``/``lin2``.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from ..mask_decoder import MLP, MaskDecoder
from ..transformer import TwoWayAttentionBlock, TwoWayTransformer
from .config import MaskDecoderExtraArgs


class _TokenMLP(MLP):
    """Two linear layers with a ReLU (SAM 2's ``MLP(d, mlp_dim, d, 2)``)."""

    def __init__(self, embedding_dim: int, mlp_dim: int):
        super().__init__(embedding_dim, mlp_dim, embedding_dim, 2)


def sam2_transformer(depth: int = 2, embedding_dim: int = 256, num_heads: int = 8,
                     mlp_dim: int = 2048) -> TwoWayTransformer:
    """SAM's two-way transformer with SAM 2's key names for the token MLPs."""
    transformer = TwoWayTransformer(depth, embedding_dim, num_heads, mlp_dim)
    for block in transformer.layers:
        cast(TwoWayAttentionBlock, block).mlp = _TokenMLP(embedding_dim, mlp_dim)  # type: ignore[assignment]
    return transformer


class Sam2MaskDecoder(MaskDecoder):
    """Predicts masks, IoUs, output tokens and an object score.

    Parameters
    ----------
    transformer_dim
        Channel width (256).
    use_high_res_features
        Add the stride-4 and stride-8 image features (after ``conv_s0``/``conv_s1``) in the
        upscaling, as every SAM 2.1 model does.
    iou_prediction_use_sigmoid
        Squash the predicted IoUs to [0, 1].
    pred_obj_scores, pred_obj_scores_mlp
        Predict from an extra token whether the object is present (by a linear layer or
        a 3-layer MLP).
    use_multimask_token_for_obj_ptr
        With multimask output, return the three multimask tokens (else the single-mask one).
    extra
        The dynamic multimask settings (``sam_mask_decoder_extra_args``).
    """

    def __init__(
        self,
        transformer_dim: int = 256,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        use_high_res_features: bool = False,
        iou_prediction_use_sigmoid: bool = False,
        pred_obj_scores: bool = False,
        pred_obj_scores_mlp: bool = False,
        use_multimask_token_for_obj_ptr: bool = False,
        extra: MaskDecoderExtraArgs | None = None,
    ):
        super().__init__(transformer_dim, sam2_transformer(embedding_dim=transformer_dim), num_multimask_outputs,
                         iou_head_depth, iou_head_hidden_dim)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, transformer_dim)
            self.pred_obj_score_head: nn.Module = (
                MLP(transformer_dim, transformer_dim, 1, 3) if pred_obj_scores_mlp else nn.Linear(transformer_dim, 1)
            )
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1)
        self.iou_prediction_use_sigmoid = iou_prediction_use_sigmoid
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr
        self.extra = extra or MaskDecoderExtraArgs()

    def predict(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predict masks for B prompt sets.

        Parameters
        ----------
        image_embeddings
            (1 or B, C, h, w) image features (broadcast over the prompts when 1).
        image_pe
            (1, C, h, w) dense positional encoding of the prompt encoder.
        sparse_prompt_embeddings
            (B, N, C) point tokens.
        dense_prompt_embeddings
            (1 or B, C, h, w) mask embedding, or the no-mask embedding (1, C, 1, 1).
        multimask_output
            Three masks instead of one.
        high_res_features
            [(1 or B, C/8, 4h, 4w), (1 or B, C/4, 2h, 2w)]: the stride-4 and stride-8
            features already through ``conv_s0``/``conv_s1``; required with
            ``use_high_res_features``.

        Returns
        -------
        masks : (B, M, 4h, 4w) low-res logits, M = 3 with multimask output, else 1
        iou_pred : (B, M)
        sam_tokens_out : (B, 3 or 1, C) mask output tokens for the object pointer
        object_score_logits : (B, 1); 10 when the model predicts no object scores
        """
        bs = sparse_prompt_embeddings.shape[0]
        first = [self.obj_score_token.weight] if self.pred_obj_scores else []
        output_tokens = torch.cat([*first, self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(bs, -1, -1), sparse_prompt_embeddings], dim=1)
        src = image_embeddings + dense_prompt_embeddings
        if src.shape[0] != bs:
            src = src.expand(bs, -1, -1, -1)
        h, w = src.shape[-2:]
        hs, keys = self.transformer(tokens, src, image_pe)
        s = 1 if self.pred_obj_scores else 0
        iou_token_out = hs[:, s, :]
        mask_tokens_out = hs[:, s + 1 : s + 1 + self.num_mask_tokens, :]

        skips = None
        if self.use_high_res_features:
            if high_res_features is None:
                raise ValueError("this SAM 2 decoder needs high_res_features (the stride-4 and stride-8 features)")
            skips = (high_res_features[1], high_res_features[0])
        # The dynamic fallback compares the single mask with the multimask ones: all four then.
        dynamic = not multimask_output and self.extra.dynamic_multimask_via_stability and not self.training
        wanted = range(0, self.num_mask_tokens) if dynamic else (
            range(1, self.num_mask_tokens) if multimask_output else range(0, 1))
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in wanted], dim=1)
        masks = self._upscale_and_project(keys.reshape(bs, h, w, -1), hyper_in, skips)
        iou_pred = self.iou_prediction_head(iou_token_out)
        if self.iou_prediction_use_sigmoid:
            iou_pred = iou_pred.sigmoid()
        iou_pred = iou_pred[:, wanted.start : wanted.stop]
        if self.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(hs[:, 0, :])
        else:
            object_score_logits = iou_pred.new_full((bs, 1), 10.0)
        if dynamic:
            masks, iou_pred = self._dynamic_multimask_via_stability(masks, iou_pred)
        if multimask_output and self.use_multimask_token_for_obj_ptr:
            sam_tokens_out = mask_tokens_out[:, 1:]
        else:
            # the single-mask token, even with multimask output: training always tracked
            # with it, so it is the object's memory token
            sam_tokens_out = mask_tokens_out[:, 0:1]
        return masks, iou_pred, sam_tokens_out, object_score_logits

    def forward(self, *args, **kwargs):
        """Same as :meth:`predict` (SAM's decoder forward has other inputs and outputs)."""
        return self.predict(*args, **kwargs)

    def stability_scores(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """IoU of the masks thresholded at +delta and -delta: (B, M) for (B, M, h, w)."""
        delta = self.extra.dynamic_multimask_stability_delta
        flat = mask_logits.flatten(-2)
        inter = (flat > delta).sum(dim=-1).float()
        union = (flat > -delta).sum(dim=-1).float()
        return torch.where(union > 0, inter / union, 1.0)

    def _dynamic_multimask_via_stability(
        self, masks: torch.Tensor, iou: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Single mask (index 0) where it is stable, else the multimask output (1..3) with
        the highest predicted IoU: (B, 1, h, w) and (B, 1)."""
        best = iou[:, 1:].argmax(dim=-1) + 1
        rows = torch.arange(masks.shape[0], device=masks.device)
        best_masks, best_iou = masks[rows, best][:, None], iou[rows, best][:, None]
        stable = self.stability_scores(masks[:, 0:1]) >= self.extra.dynamic_multimask_stability_thresh
        return (torch.where(stable[..., None, None], masks[:, 0:1], best_masks),
                torch.where(stable, iou[:, 0:1], best_iou))
