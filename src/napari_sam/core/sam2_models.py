"""Loading a SAM 2.1 by registry name or checkpoint file, onto a device.

SAM 2.1 is the model that propagates objects through Z and T with memory; it sits beside
SAM (:func:`napari_sam.core.models.load_model`), in a family of its own in the registry
(:data:`napari_sam.weights.FAMILIES`). Meta's checkpoints hold ``{"model": state_dict}``;
they are read with ``torch.load(weights_only=True)`` (:func:`napari_sam.model.checkpoint.read_checkpoint`)
and their size (tiny, small, base+, large) is inferred from the keys and shapes. A SAM
checkpoint given here, or a SAM 2.1 one given to ``load_model``, is refused in one line that
says which loader takes it. What a user gave (``model=``, ``tracker=``) is split here into
the SAM that answers prompts and the SAM 2 that propagates (:func:`split_models`).
"""

from __future__ import annotations

import os

import torch

from ..model.checkpoint import ModelSource, file_stat, read_checkpoint
from ..model.sam2 import Sam2, Sam2Config, config_from_dict, sam2_from_state_dict
from .models import family_mismatch, model_family, resolve_checkpoint, resolve_device, resolve_model, state_dict_family
from .runtime import configure_runtime

__all__ = ["NoSam", "load_sam2_model", "split_models"]


def load_sam2_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    config: Sam2Config | str | None = None,
) -> Sam2:
    """Load a SAM 2.1 from the registry or from a checkpoint file.

    Parameters
    ----------
    name_or_path
        A SAM 2.1 registry name (``"sam2.1_hiera_tiny"``, ``"sam2.1_hiera_small"``,
        ``"sam2.1_hiera_base_plus"``, ``"sam2.1_hiera_large"``; downloaded once into the
        cache, checksum verified) or a checkpoint file in the official layout
        (``{"model": state_dict}``, official key names; a bare state dict is read too).
    device
        ``"cpu"``, ``"cuda"``, ``"mps"``, or None/``"auto"`` for the best one present.
    config
        The configuration the weights were made for (a :class:`~napari_sam.model.sam2.Sam2Config`
        or a name in :data:`~napari_sam.model.sam2.CONFIGS`); None takes the one the
        checkpoint records (``write_checkpoint(..., metadata={"config": config_to_dict(c)})``),
        else recognises the released size whose keys and shapes the weights have (settings
        that leave no trace in the weights then take the official builders' values). Pass it
        for any other model.

    Returns
    -------
    Sam2
        In evaluation mode, float32, on ``device``, with ``source`` naming where the weights
        came from.

    Raises
    ------
    ValueError
        For an unknown name or a missing file; for a SAM (1) name or checkpoint (one line
        saying that :func:`~napari_sam.core.models.load_model` takes it); for a file that is
        not a checkpoint or would need unpickling arbitrary objects; for a state dict that
        does not fit (naming the missing, unexpected and misshapen keys).
    """
    configure_runtime()
    name, path, _ = resolve_checkpoint(name_or_path, "sam2")
    device = resolve_device(device)
    stat = file_stat(path)  # before the read (see load_model)
    checkpoint = read_checkpoint(path)
    state = checkpoint.state_dict
    if state_dict_family(state) != "sam2":
        raise ValueError(family_mismatch(str(path), "sam"))
    if config is None and checkpoint.metadata.get("config"):  # our checkpoints record theirs (any size)
        config = config_from_dict(checkpoint.metadata["config"])
    model = sam2_from_state_dict(state, config, device=device)
    model.source = ModelSource(name=name, path=str(path), dtype="float32", stat=stat)
    return model


def split_models(model=None, tracker=None, device=None, dtype="auto"):
    """The SAM that answers prompts and the SAM 2 that propagates, from what a user gave.

    Parameters
    ----------
    model
        A SAM (loaded, name, file, or None for the default:
        :func:`~napari_sam.core.models.resolve_model`), or a SAM 2: then there is no SAM,
        and the SAM 2 propagates.
    tracker
        A SAM 2 (loaded :class:`~napari_sam.model.sam2.Sam2`, registry name or checkpoint
        file) to propagate with beside the SAM; None for none.

    Returns
    -------
    (Sam or None, Sam2 or None)
    """
    def sam2(spec):
        model_family(spec)  # anything but a model, a name or a path: named in one line
        return spec if isinstance(spec, Sam2) else load_sam2_model(spec, device)

    if model_family(model) == "sam2":
        if tracker is not None:
            raise ValueError("model= is a SAM 2 already; give tracker= only beside a SAM")
        return None, sam2(model)
    return resolve_model(model, device, dtype), None if tracker is None else sam2(tracker)


class NoSam:
    """Stands where an annotator's SAM embeddings would be when it holds a SAM 2 only:
    whatever is asked of it is refused in one line."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr):
        raise ValueError(f"{self.name} is a SAM 2: it propagates objects, but segmenting from prompts needs a SAM "
                         f"(give model= a SAM and tracker= the SAM 2)")
