"""Finding micro-sam's instance decoder (``decoder_state``) in a checkpoint file, safely.

micro-sam keeps it in two layouts, both read here with ``torch.load(weights_only=True)``
(through :mod:`.checkpoint`, which refuses files that need arbitrary unpickling):

- beside SAM in one file, ``{"model_state": <SAM>, "decoder_state": <decoder>}`` (its
  exported and fine-tuned models; training checkpoints add optimizer state and counters);
- alone, as the plain decoder state dict (its registry's ``vit_b_lm_decoder`` and similar
  files, downloaded beside the SAM weights).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from .checkpoint import CheckpointError, PathLike, load_file
from .instance_decoder import InstanceDecoder, instance_decoder_from_state_dict

__all__ = ["DECODER_KEY", "DECODER_MODES", "find_decoder_state", "load_instance_decoder", "read_decoder_state"]

DECODER_KEY = "decoder_state"
"""Top-level key under which micro-sam's checkpoints keep the instance decoder."""

DECODER_MODES = ("ais", "apg")
"""The automatic modes (:mod:`napari_sam.auto`) that read the instance decoder: a model
without one cannot run them, nor recommend them."""

_MARKER = "out_conv.weight"
"""A key that every instance decoder has and no SAM has: tells a decoder-only file."""


def find_decoder_state(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The instance decoder's state in an already-loaded checkpoint object.

    Parameters
    ----------
    obj
        What ``torch.load`` returned, or :attr:`Checkpoint.extras` of a SAM checkpoint.
    source
        How to name the object in error messages (usually the file path).

    Returns
    -------
    dict of str to torch.Tensor
        The ``decoder_state`` entry, or ``obj`` itself when it is a decoder state dict.

    Raises
    ------
    CheckpointError
        "<source> has no instance decoder (decoder_state)" when there is none, or naming
        the entries of the decoder state that are not tensors.
    """
    if isinstance(obj, Mapping) and isinstance(obj.get(DECODER_KEY), Mapping):
        state = obj[DECODER_KEY]
    elif isinstance(obj, Mapping) and _MARKER in obj:
        state = obj
    else:
        raise CheckpointError(f"{source} has no instance decoder ({DECODER_KEY})")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} {DECODER_KEY} entries are not tensors: {', '.join(bad[:10])}")
    return dict(state)


def read_decoder_state(path: PathLike) -> dict[str, torch.Tensor]:
    """Read the instance decoder's state from a micro-sam checkpoint or decoder file.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    UntrustedCheckpointError
        When reading the file would need unpickling arbitrary Python objects.
    CheckpointError
        When the file is not a PyTorch checkpoint or holds no instance decoder.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"no checkpoint file at {name}")
    return find_decoder_state(load_file(name), source=name)


def load_instance_decoder(path: PathLike) -> InstanceDecoder:
    """The instance decoder of a micro-sam checkpoint or decoder file, weights loaded strictly.

    Returns
    -------
    InstanceDecoder
        In eval mode, on the CPU, float32; its configuration inferred from the weights.

    Raises
    ------
    CheckpointError
        As :func:`read_decoder_state`, and naming every key that does not fit.
    """
    name = os.fspath(path)
    state = read_decoder_state(name)
    try:
        return instance_decoder_from_state_dict(state)
    except CheckpointError as err:
        raise CheckpointError(f"{name}: {err}") from err
