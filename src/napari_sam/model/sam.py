"""The composed Segment Anything model and its builder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, ModelSource, check_state_dict
from .config import CONFIGS, SamConfig, TinyViTConfig, ViTConfig, infer_config
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transformer import ImageContext, TwoWayTransformer

if TYPE_CHECKING:
    from .instance_decoder import InstanceDecoder
    from .mask_refiner import MaskRefiner
    from .tiny_vit import TinyViT


class Sam(nn.Module):
    """Image encoder + prompt encoder + mask decoder.

    The submodule names are those of the official checkpoints. Use :func:`build_sam` to
    construct one from a configuration, and :func:`sam_from_state_dict` to load weights.

    Parameters
    ----------
    config
        The variant; its encoder field picks ViT or TinyViT.
    """

    mask_threshold: float = 0.0
    # Registered as buffers in __init__; declared so that they read as tensors.
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(self, config: SamConfig):
        super().__init__()
        self.config = config
        enc = config.encoder
        self.image_encoder: ImageEncoderViT | TinyViT
        if isinstance(enc, ViTConfig):
            self.image_encoder = ImageEncoderViT(enc)
        elif isinstance(enc, TinyViTConfig):
            from .tiny_vit import TinyViT

            self.image_encoder = TinyViT(enc)
        else:
            raise TypeError(f"unknown encoder configuration {type(enc).__name__}")
        grid = config.embedding_size
        self.prompt_encoder = PromptEncoder(
            config.prompt_embed_dim, (grid, grid), (config.image_size, config.image_size), config.mask_in_chans
        )
        self.mask_decoder = MaskDecoder(
            config.prompt_embed_dim,
            TwoWayTransformer(
                config.decoder_depth, config.prompt_embed_dim, config.decoder_heads, config.decoder_mlp_dim
            ),
            config.num_multimask_outputs,
            config.iou_head_depth,
            config.iou_head_hidden_dim,
        )
        self.source: ModelSource | None = None
        """Where the weights came from (set by the loader; None for a model built in memory)."""
        self.metadata: dict = {}
        """The checkpoint's metadata (configuration, training provenance, advice such as
        ``"automatic"``); plain JSON types, empty for official checkpoints."""
        # Kept outside the module tree: the official key format (what state_dict() gives and
        # checkpoints store under "state_dict") has no place for it; micro-sam stores it apart too.
        self._heads: dict[str, nn.Module] = {}
        # Not part of the checkpoints (the official model does not save them either).
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(-1, 1, 1), persistent=False)

    def init_non_persistent_buffers(self) -> None:
        """Rebuild the normalisation constants (not stored in checkpoints)."""
        self.pixel_mean = torch.tensor(self.config.pixel_mean).view(-1, 1, 1)
        self.pixel_std = torch.tensor(self.config.pixel_std).view(-1, 1, 1)

    def __setattr__(self, name: str, value) -> None:
        # nn.Module would register a module assigned here as a submodule, past the property.
        if name in ("instance_decoder", "mask_refiner"):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def instance_decoder(self) -> InstanceDecoder | None:
        """micro-sam's instance decoder (:mod:`~napari_sam.model.instance_decoder`) when the
        checkpoint carries one (its ``decoder_state``), else None.

        It is not a submodule: ``state_dict()``, ``to()`` and ``train()`` leave it alone;
        the loader puts it on the model's device in eval mode.
        """
        return self._heads.get("instance_decoder")  # type: ignore[return-value]

    @instance_decoder.setter
    def instance_decoder(self, decoder: InstanceDecoder | None) -> None:
        if decoder is None:
            self._heads.pop("instance_decoder", None)
        else:
            self._heads["instance_decoder"] = decoder

    @property
    def mask_refiner(self) -> MaskRefiner | None:
        """The head that sharpens prompted masks with the image
        (:mod:`~napari_sam.model.mask_refiner`) when the checkpoint carries one, else None;
        like :attr:`instance_decoder`, not a submodule."""
        return self._heads.get("mask_refiner")  # type: ignore[return-value]

    @mask_refiner.setter
    def mask_refiner(self, refiner: MaskRefiner | None) -> None:
        if refiner is None:
            self._heads.pop("mask_refiner", None)
        else:
            self._heads["mask_refiner"] = refiner

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise (B, 3, h, w) RGB values in [0, 255] and zero-pad bottom/right to the
        square model input."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        size = self.config.image_size
        return F.pad(x, (0, size - w, 0, size - h))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image embedding (B, 256, 64, 64) of already resized RGB images (B, 3, h, w), longest
        side equal to the model's input size, values in [0, 255]."""
        x = self.preprocess(x.float()).to(self.encoder_dtype)
        return self.image_encoder(x).float()

    @property
    def encoder_dtype(self) -> torch.dtype:
        """Precision of the image encoder's weights (the rest of the model stays float32)."""
        return next(self.image_encoder.parameters()).dtype

    def image_context(self, embedding: torch.Tensor) -> ImageContext:
        """Decoder work that depends only on the image (1, 256, 64, 64), reusable for every
        prompt without a mask input."""
        return self._context_of(embedding + self.prompt_encoder.no_mask_dense())

    def _context_of(self, src: torch.Tensor, key_pe: torch.Tensor | None = None) -> ImageContext:
        pe = None if key_pe is not None else self.prompt_encoder.get_dense_pe()
        return self.mask_decoder.transformer.image_context(src, pe, key_pe)

    def decode(
        self,
        embedding: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        context: ImageContext | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res masks for a batch of prompt sets on one image.

        Parameters
        ----------
        embedding
            (1, 256, 64, 64) image embedding.
        point_coords, point_labels
            (B, N, 2) as (x, y) in the padded model-input frame, and (B, N) labels.
        boxes
            (B, 4) as (x0, y0, x1, y1) in the model-input frame.
        mask_input
            (B, 1, 256, 256) low-res logits from an earlier prediction.
        multimask_output
            Three masks per prompt set instead of one.
        context
            Result of :meth:`image_context` for this embedding: decode by the cheaper
            route that reuses it (the plain route, without it, is the one training
            differentiates). A mask input changes the image side, so with one the
            context is computed again for the embedding plus the mask, and the same
            route follows.

        Returns
        -------
        low_res_logits : (B, C, 256, 256)
        iou_predictions : (B, C)
        """
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = self.prompt_encoder(points, boxes, mask_input)
        if context is not None:
            if dense is not None:
                # Three projections of the image tokens, then the click's route: far less
                # than projecting them in every layer, as the plain route does.
                context = self._context_of(embedding + dense, context.key_pe)
            return self.mask_decoder(sparse, multimask_output, context=context)
        if dense is None:
            dense = self.prompt_encoder.no_mask_dense()
        return self.mask_decoder(
            sparse,
            multimask_output,
            image_embeddings=embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            dense_prompt_embeddings=dense,
        )

    def postprocess_masks(self, masks: torch.Tensor, input_size: tuple[int, int],
                          original_size: tuple[int, int]) -> torch.Tensor:
        """Low-res logits (B, C, 256, 256) to logits at the original image size.

        Upscales to the padded input, crops the padding away, then resizes to the original
        size, both bilinearly, as the official model does (so thresholds agree).
        """
        size = self.config.image_size
        masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        if tuple(masks.shape[-2:]) != tuple(original_size):
            masks = F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
        return masks


def build_sam(config: SamConfig | str) -> Sam:
    """Construct an (untrained) SAM in evaluation mode.

    Parameters
    ----------
    config
        A :class:`SamConfig` or one of the names in :data:`~napari_sam.model.config.CONFIGS`.
        Build under ``torch.device("meta")`` to get the structure without allocating weights.
    """
    if isinstance(config, str):
        try:
            config = CONFIGS[config]
        except KeyError:
            raise ValueError(f"unknown SAM configuration {config!r}; known: {sorted(CONFIGS)}") from None
    return Sam(config).eval()


def sam_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: SamConfig | str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Sam:
    """Build a SAM and load official-format weights into it strictly.

    Parameters
    ----------
    state_dict
        Official key format (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).
    config
        The variant; inferred from the keys and shapes when None.
    device, dtype
        Where the weights go. ``dtype`` applies to floating-point parameters.
    """
    if config is None:
        config = infer_config(state_dict)
    with torch.device("meta"):
        model = build_sam(config)
    check_state_dict(model.state_dict(), state_dict)
    model.load_state_dict(state_dict, strict=True, assign=True)
    # Buffers that are not in checkpoints were created on meta: rebuild them.
    for module in model.modules():
        init = getattr(module, "init_non_persistent_buffers", None)
        if init is not None:
            init()
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            raise CheckpointError(f"buffer {name} is neither in the checkpoint nor rebuilt")
    return model.to(device=device, dtype=dtype).eval()
