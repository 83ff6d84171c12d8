"""Which parameters of SAM learn in a mode, and the optimizer that moves them.

``"decoder"`` trains the prompt encoder and mask decoder; ``"full"`` the image encoder
too, except its first ``freeze_encoder_blocks`` blocks (with the patch embedding).
"""

from __future__ import annotations

import torch

from ..model import Sam
from .config import TrainingConfig

__all__ = ["make_optimizer", "set_trainable"]


def _encoder_blocks(encoder: torch.nn.Module) -> tuple[list[torch.nn.Module], list[torch.nn.Parameter]]:
    """(blocks in order, stem parameters) of a ViT or TinyViT encoder."""
    if hasattr(encoder, "blocks"):
        stem = list(encoder.patch_embed.parameters()) + [encoder.pos_embed]
        return list(encoder.blocks), stem
    if hasattr(encoder, "layers"):
        return [b for layer in encoder.layers for b in layer.blocks], list(encoder.patch_embed.parameters())
    raise ValueError(f"do not know the blocks of a {type(encoder).__name__} encoder")


def set_trainable(model: Sam, config: TrainingConfig) -> list[str]:
    """Switch gradients on for the parts ``config.mode`` trains and off for the rest (in
    ``"full"`` mode the encoder is cast to float32 first).

    Returns
    -------
    list of str
        Names of the trainable parameters, in ``named_parameters`` order (checkpoints
        store them beside the optimizer state, to refuse a state of other parameters).

    Raises
    ------
    ValueError
        When more blocks are to be frozen than the encoder has.
    """
    cfg = config
    if cfg.mode == "full":
        model.image_encoder.float()
    for p in model.parameters():
        p.requires_grad_(False)
    for module in (model.prompt_encoder, model.mask_decoder):
        for p in module.parameters():
            p.requires_grad_(True)
    if cfg.mode == "full":
        blocks, stem = _encoder_blocks(model.image_encoder)
        if cfg.freeze_encoder_blocks > len(blocks):
            raise ValueError(
                f"freeze_encoder_blocks={cfg.freeze_encoder_blocks}, but the encoder has only {len(blocks)} blocks"
            )
        for p in model.image_encoder.parameters():
            p.requires_grad_(True)
        if cfg.freeze_encoder_blocks:
            for p in stem:
                p.requires_grad_(False)
            for block in blocks[: cfg.freeze_encoder_blocks]:
                for p in block.parameters():
                    p.requires_grad_(False)
            # A TinyViT stage's downsampling belongs to it: frozen with its last block.
            for layer in getattr(model.image_encoder, "layers", []):
                if getattr(layer, "downsample", None) is not None and all(
                    not p.requires_grad for b in layer.blocks for p in b.parameters()
                ):
                    layer.downsample.requires_grad_(False)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(model: Sam, names: list[str], config: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over the parameters ``names``, at the learning rate of the first step.

    Weight decay applies to matrices and kernels only: decaying norms, biases and learned
    embeddings towards zero only hurts.
    """
    named = dict(model.named_parameters())
    decay = [named[n] for n in names if named[n].ndim >= 2 and not n.endswith("pos_embed")]
    no_decay = [named[n] for n in names if not (named[n].ndim >= 2 and not n.endswith("pos_embed"))]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate_at(0),
    )
