"""Reading SAM checkpoints safely, in any of the layouts in circulation, as official keys.

Files are read with ``torch.load(..., weights_only=True)``: tensors, containers and plain
values only. A file that needs arbitrary unpickling (a pickled class, a whole model
object) is refused: unpickling runs code chosen by whoever wrote the file.

Layouts understood, all normalised to the official key format (``image_encoder.*``,
``prompt_encoder.*``, ``mask_decoder.*``):

- a plain official state dict (Meta's SAM, MobileSAM, micro-sam's exported models);
- a dict wrapping the state dict under ``"model_state"`` (micro-sam / torch-em training
  checkpoints, whose keys carry the ``sam.`` prefix of micro-sam's trainable wrapper),
  ``"model"`` or ``"state_dict"``;
- key prefixes left by wrappers: ``module.`` (DataParallel), ``_orig_mod.``
  (``torch.compile``), ``sam.`` and ``model.``;
- our own checkpoints: the state dict under ``"state_dict"`` and a metadata dict of plain
  JSON types (configuration, training provenance) under ``"napari_sam"``.

Other top-level entries (micro-sam's instance-segmentation ``decoder_state``, optimizer
state, epoch counters) are returned apart, as :attr:`Checkpoint.extras`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

import torch

from .atomic_save import save_whole
from .model_source import ModelSource, file_stat  # re-exported: the loaders' one import place

__all__ = ["METADATA_KEY", "SAM_MODULES", "Checkpoint", "ModelSource", "CheckpointError", "UntrustedCheckpointError",
           "check_state_dict", "file_stat", "normalize_checkpoint", "read_checkpoint", "read_state_dict",
           "write_checkpoint"]

PathLike = Union[str, "os.PathLike[str]"]

SAM_MODULES = ("image_encoder", "prompt_encoder", "mask_decoder")
"""Top-level submodules of SAM: every official key starts with one of them and a dot."""

METADATA_KEY = "napari_sam"
"""Top-level key under which our own checkpoints keep their metadata dict."""

_WRAPPER_KEYS = ("model_state", "model", "state_dict")
"""Keys under which training frameworks nest the state dict, in the order tried."""

_KEY_PREFIXES = ("module.", "_orig_mod.", "sam.", "model.")
"""Prefixes that wrappers add in front of the official keys."""

_NON_PARAMETERS = ("pixel_mean", "pixel_std")
"""Normalisation buffers that some re-saved checkpoints contain; the official ones do not."""

_MAX_LISTED = 10


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint that can only be read by unpickling arbitrary objects (refused)."""


@dataclass(frozen=True)
class Checkpoint:
    """The contents of a checkpoint file, normalised.

    Attributes
    ----------
    state_dict
        SAM's tensors under official key names.
    extras
        Every other top-level entry of the file, unchanged (for instance micro-sam's
        ``decoder_state``, an optimizer state, ``pixel_mean``).
    metadata
        The ``"napari_sam"`` dict of our own checkpoints (configuration, provenance);
        empty for other files.
    """

    state_dict: dict[str, torch.Tensor]
    extras: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def _few(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _is_sam_key(key: str) -> bool:
    return key.split(".", 1)[0] in SAM_MODULES and "." in key


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _strip_prefixes(key: str) -> str:
    stripped = key
    while not _is_sam_key(stripped):
        for prefix in _KEY_PREFIXES:
            if stripped.startswith(prefix):
                stripped = stripped[len(prefix):]
                break
        else:
            return key  # not a wrapped SAM key: leave it as it was, for the mismatch report
    return stripped


def _looks_like_checkpoint(name: str) -> bool:
    """Whether the file starts as a PyTorch archive (zip), a pickle (protocol 2-5) or a legacy
    tar does: other bytes would reach the unpickler, whose complaint reads as unsafe objects."""
    with open(name, "rb") as fh:
        head = fh.read(512)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04",
                                                                                 b"\x05") or head[257:262] == b"ustar"


def load_file(path: PathLike) -> Any:
    """A checkpoint file's contents, read as untrusted (``weights_only``: tensors and plain
    values); a file that is not a checkpoint, or that holds pickled objects, is a
    :class:`CheckpointError` saying which."""
    name = os.fspath(path)
    if not _looks_like_checkpoint(name):
        raise CheckpointError(f"{name} is not a readable PyTorch checkpoint (neither a PyTorch archive nor a pickle)")
    try:
        return torch.load(name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "weights only" not in text.lower() and "weights_only" not in text.lower():
            raise CheckpointError(f"{name} is not a readable PyTorch checkpoint: {text}") from err
        match = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        culprit = f" (it holds an object of class {match.group(1)})" if match else ""
        raise UntrustedCheckpointError(
            f"refused to load {name}{culprit}: it contains pickled Python objects other than tensors and "
            f"plain values, and unpickling those can run arbitrary code, so the file is treated as untrusted. "
            f"If you trust its origin, extract the weights in a separate Python session, e.g. "
            f"state = torch.load(path, weights_only=False); torch.save(state['model_state'], 'weights.pt') "
            f"(or whichever entry holds the state dict), and load that file instead."
        ) from err
    except OSError:
        raise
    except Exception as err:  # torch reports damaged files as RuntimeError, EOFError, KeyError, ...
        raise CheckpointError(
            f"{name} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})"
        ) from err


def normalize_checkpoint(obj: Any, source: str = "checkpoint") -> Checkpoint:
    """Normalise an already-loaded checkpoint object (see the module docstring).

    Parameters
    ----------
    obj
        What ``torch.load`` returned.
    source
        How to name the object in error messages (usually the file path).

    Returns
    -------
    Checkpoint

    Raises
    ------
    CheckpointError
        When ``obj`` holds no SAM state dict, when its entries are not tensors, when two
        keys map to the same official name, or when the metadata is not a dict.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a dict of weights")
    top = dict(obj)

    metadata = top.pop(METADATA_KEY, {})
    if not isinstance(metadata, Mapping):
        raise CheckpointError(f"{source}: the {METADATA_KEY!r} entry must be a dict, not {type(metadata).__name__}")

    if _is_state_dict(top):
        state, extras = top, {}
    else:
        wrapper = next((k for k in _WRAPPER_KEYS if k in top and isinstance(top[k], Mapping)), None)
        if wrapper is None:
            raise CheckpointError(
                f"{source} holds no SAM state dict: expected tensors under keys starting with "
                f"{', '.join(m + '.' for m in SAM_MODULES)}, or a dict under one of {list(_WRAPPER_KEYS)}; "
                f"found top-level keys {_few([str(k) for k in top])}"
            )
        state = dict(top.pop(wrapper))
        extras = top
        # One more level of nesting (e.g. a Lightning checkpoint saved inside a wrapper).
        if not _is_state_dict(state):
            inner = next((k for k in _WRAPPER_KEYS if k in state and isinstance(state[k], Mapping)), None)
            if inner is not None:
                extras.update({f"{wrapper}.{k}": v for k, v in state.items() if k != inner})
                state = dict(state[inner])

    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} state-dict entries are not tensors: {_few(bad)}")

    normalized: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        name = _strip_prefixes(key)
        if name in _NON_PARAMETERS:
            extras[name] = value
            continue
        if name in normalized:
            raise CheckpointError(f"{source}: keys {origin[name]!r} and {key!r} both map to {name!r}")
        normalized[name] = value
        origin[name] = key

    if not any(_is_sam_key(k) for k in normalized):
        raise CheckpointError(
            f"{source} holds no SAM weights: no key starts with "
            f"{', '.join(m + '.' for m in SAM_MODULES)} (first keys: {_few(list(state))})"
        )
    return Checkpoint(state_dict=normalized, extras=extras, metadata=dict(metadata))


def read_checkpoint(path: PathLike) -> Checkpoint:
    """Read a checkpoint file safely and normalise it to official SAM keys.

    Parameters
    ----------
    path
        A ``.pth``/``.pt`` file written by ``torch.save``.

    Returns
    -------
    Checkpoint
        The state dict (official keys, tensors on the CPU, dtypes as stored), the other
        top-level entries, and our metadata if any.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    UntrustedCheckpointError
        When reading the file would need unpickling arbitrary Python objects.
    CheckpointError
        When the file is not a PyTorch checkpoint or holds no SAM state dict.
    """
    if not os.path.isfile(os.fspath(path)):
        raise FileNotFoundError(f"no checkpoint file at {os.fspath(path)}")
    return normalize_checkpoint(load_file(path), source=os.fspath(path))


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Read only the SAM state dict of a checkpoint file (see :func:`read_checkpoint`).

    Returns
    -------
    dict of str to torch.Tensor
        Official key format: ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``.
    """
    return read_checkpoint(path).state_dict


def write_checkpoint(
    path: PathLike,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    extras: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> None:
    """Write a checkpoint that :func:`read_checkpoint` reads back with its metadata.

    The file holds ``{"state_dict": ..., "napari_sam": metadata}`` and loads with
    ``weights_only=True``. It is written to a temporary file first and then moved into
    place, so a crash never leaves half a checkpoint under ``path``.

    Parameters
    ----------
    path
        Destination file.
    state_dict
        Tensors under official key names (e.g. ``model.state_dict()``).
    metadata
        Plain JSON types only (dicts, lists, strings, numbers, booleans, None): for
        instance the configuration and the training provenance.
    extras
        Further state dicts stored as top-level entries beside the SAM weights (read back
        into :attr:`Checkpoint.extras`), e.g. micro-sam's ``"decoder_state"``.

    Raises
    ------
    CheckpointError
        When ``metadata`` is not JSON-serialisable or ``state_dict`` holds non-tensors.
    """
    try:
        # Through JSON and back: str subclasses such as torch.__version__ would otherwise be
        # pickled as their class, which a weights_only load refuses.
        metadata = json.loads(json.dumps(dict(metadata or {}), allow_nan=True))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint metadata must be plain JSON types: {err}") from err
    extras = {str(k): dict(v) for k, v in (extras or {}).items()}
    for entries in (state_dict, *extras.values()):
        bad = [str(k) for k, v in entries.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{len(bad)} state-dict entries are not tensors: {_few(bad)}")
    if {"state_dict", METADATA_KEY} & set(extras):
        raise CheckpointError("extras may not be named 'state_dict' or " + repr(METADATA_KEY))
    save_whole({"state_dict": dict(state_dict), METADATA_KEY: metadata, **extras}, path)


ShapeLike = Union[torch.Size, Sequence[int], torch.Tensor]


def _shape(value: ShapeLike) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(int(n) for n in value)


def check_state_dict(
    expected: Mapping[str, ShapeLike],
    state_dict: Mapping[str, torch.Tensor],
    what: str = "the SAM model",
) -> None:
    """Check that a state dict has exactly the expected keys and shapes.

    Parameters
    ----------
    expected
        Key to shape (a ``torch.Size``, a tuple of ints, or a tensor whose shape is
        used), e.g. ``model.state_dict()`` of a model built on the meta device.
    state_dict
        The state dict to check, in official key format.
    what
        How to name the model in the message.

    Raises
    ------
    CheckpointError
        Naming the missing keys, the unexpected keys and the shape mismatches: their
        counts, and up to ten of each.
    """
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = []
    for key, want in expected.items():
        if key in state_dict:
            got = tuple(state_dict[key].shape)
            if got != _shape(want):
                mismatched.append(f"{key}: checkpoint {got} vs model {_shape(want)}")
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): {_few(mismatched)}")
    raise CheckpointError(f"the state dict does not fit {what}: " + "; ".join(parts))
