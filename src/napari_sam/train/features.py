"""The image embeddings of training planes.

In ``"decoder"`` mode the encoder is frozen, so each plane is embedded once and its
embedding kept (on the CPU) for the whole run; in ``"full"`` mode the encoder learns and
every use embeds again, with gradients when asked.
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.image_embedding import ImageEmbedding
from ..core.preprocess import prepare_plane
from ..core.stain import plane_channel
from ..model import Sam
from .config import TrainingConfig
from .dataset import SegmentationDataset

__all__ = ["TrainingEmbeddings", "autocast"]


def autocast(device: torch.device, config: TrainingConfig):
    """The bfloat16 autocast context of ``config.bfloat16`` (a no-op when off)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bfloat16)


class TrainingEmbeddings:
    """Embeddings of the planes of any number of datasets, for one model in training.

    Parameters
    ----------
    model
        The Sam in training.
    config
        ``mode`` (cache or not), ``normalization`` and ``bfloat16`` are used.
    device
        Where the embeddings are used.
    """

    def __init__(self, model: Sam, config: TrainingConfig, device: torch.device):
        self.model = model
        self.config = config
        self.device = device
        # Keyed by the dataset object itself: indices alone would mix up datasets.
        self._cache: dict[SegmentationDataset, dict[int, ImageEmbedding]] = {}

    def _embed(self, data: SegmentationDataset, index: int) -> ImageEmbedding:
        image = data[index].image
        x, original_size = prepare_plane(
            image,
            self.config.normalization,
            data.channel_axis,
            # as the plugin reads it: stained brightfield per the model's advice
            plane_channel(self.model, image, data.channel_axis, data.channel),
            long_side=self.model.config.image_size,
        )
        with autocast(self.device, self.config):
            emb = self.model.embed(x.to(self.device))
        return ImageEmbedding(emb.float(), (int(x.shape[-2]), int(x.shape[-1])), original_size)

    def get(self, data: SegmentationDataset, index: int, grad: bool) -> ImageEmbedding:
        """The embedding of pair ``index`` of ``data``, on the device.

        Parameters
        ----------
        grad
            Let gradients reach the encoder (``"full"`` mode only; a frozen encoder's
            cached answer never has them).

        Returns
        -------
        ImageEmbedding
            Float32 features (1, 256, S, S) with the plane's sizes.
        """
        if self.config.mode == "full":
            with torch.set_grad_enabled(grad):
                return self._embed(data, index)
        cache = self._cache.setdefault(data, {})
        if index not in cache:
            # The frozen encoder's answer never changes: embed once, keep it on the CPU.
            with torch.no_grad():
                emb = self._embed(data, index)
            cache[index] = dataclasses.replace(emb, features=emb.features.cpu())
        emb = cache[index]
        return dataclasses.replace(emb, features=emb.features.to(self.device))

    def clear(self) -> None:
        """Forget the cached embeddings."""
        self._cache.clear()
