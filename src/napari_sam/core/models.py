"""Loading a SAM by registry name or checkpoint file, onto a device, in a precision."""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model import Sam, config_from_dict, infer_config, sam_from_state_dict

__all__ = ["DEFAULT_MODEL", "DTYPES", "ModelSource", "load_model", "model_identity", "resolve_device", "resolve_dtype", "native_bfloat16"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Encoder precisions by name. float32 reproduces the official outputs; bfloat16 halves
memory and is about twice as fast where the hardware computes it natively."""


@dataclass
class ModelSource:
    """Where a loaded model came from: enough to tell whether cached embeddings fit it.

    Attributes
    ----------
    name
        Registry name, or the checkpoint's file name for a local file.
    path
        The checkpoint file.
    dtype
        Encoder precision name.
    """

    name: str
    path: str
    dtype: str
    _checksum: str | None = field(default=None, repr=False)

    @property
    def checksum(self) -> str:
        """sha256 of the checkpoint file (computed once, on first use)."""
        if self._checksum is None:
            digest = hashlib.sha256()
            with open(self.path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(block)
            self._checksum = "sha256:" + digest.hexdigest()
        return self._checksum


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (so bfloat16 is faster, not slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as fh:
                flags = fh.read()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"``: CUDA if present, else Apple's MPS, else the CPU."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU here")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' was asked for, but it is not available here")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 where the device computes it natively, float32 elsewhere."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', not {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}")
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("float16 is for GPUs; on a CPU use bfloat16 or float32")
    if dtype == torch.bfloat16 and not native_bfloat16(device) and device.type == "cpu":
        warnings.warn(
            "this CPU has no native bfloat16 (AVX512-BF16 or AMX): bfloat16 will be slower than float32 here",
            RuntimeWarning,
            stacklevel=3,
        )
    return dtype


DEFAULT_MODEL = "default"
"""Name of the small model shipped inside the package (works offline; see docs/default_model.md)."""
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "_models" / "default.pth"


def _resolve_checkpoint(name_or_path: str | os.PathLike) -> tuple[str, Path]:
    from ..weights import REGISTRY, fetch_checkpoint

    text = os.fspath(name_or_path)
    if text == DEFAULT_MODEL:
        if not DEFAULT_CHECKPOINT.is_file():
            raise ValueError(f"the default model is not installed ({DEFAULT_CHECKPOINT} is missing)")
        return DEFAULT_MODEL, DEFAULT_CHECKPOINT
    if text in REGISTRY:
        return text, Path(fetch_checkpoint(text))
    path = Path(text).expanduser()
    if path.is_file():
        return path.name, path
    if path.exists():
        raise ValueError(f"{path} is not a checkpoint file")
    raise ValueError(
        f"{text!r} is neither a model name nor an existing checkpoint file. "
        f"Known model names: {', '.join(sorted(REGISTRY))}"
    )


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "float32",
) -> Sam:
    """Load a SAM from the registry or from a checkpoint file.

    Parameters
    ----------
    name_or_path
        A registry name (see :func:`napari_sam.weights.list_models`; downloaded once into
        the cache, with its checksum verified) or a path to a checkpoint in the official
        key format, micro-sam's format, or ours.
    device
        ``"cpu"``, ``"cuda"``, ``"mps"``, or None/``"auto"`` for the best one present.
    dtype
        Precision of the image encoder: ``"float32"`` (exact; default), ``"bfloat16"``,
        ``"float16"`` (GPU only) or ``"auto"`` (bfloat16 where the hardware computes it
        natively). The prompt encoder and mask decoder stay in float32.

    Returns
    -------
    Sam
        In evaluation mode, with ``model.source`` (a :class:`ModelSource`) set.

    Raises
    ------
    ValueError
        For an unknown name, a missing file or a state dict that does not fit (the error
        names the missing, unexpected and misshapen keys).
    """
    from ..model.checkpoint import read_checkpoint

    name, path = _resolve_checkpoint(name_or_path)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    checkpoint = read_checkpoint(path)
    # Our checkpoints record their configuration (needed for inputs other than 1024 pixels,
    # which shapes alone do not reveal); others are recognised by their shapes.
    stored = checkpoint.metadata.get("config")
    config = config_from_dict(stored) if stored else infer_config(checkpoint.state_dict)
    model = sam_from_state_dict(checkpoint.state_dict, config, device=device)
    model.image_encoder.to(torch_dtype)
    dtype_name = next(k for k, v in DTYPES.items() if v == torch_dtype)
    model.source = ModelSource(name=name, path=str(path), dtype=dtype_name)
    model.checkpoint_metadata = dict(checkpoint.metadata)
    return model


def model_identity(model: Sam) -> tuple[str, str, str]:
    """(name, checksum, encoder precision) of a model: what cached embeddings depend on.

    A model loaded from a file is identified by the file's checksum; one built in memory
    (tests, a model being trained) by a hash of its weights.
    """
    dtype = next(k for k, v in DTYPES.items() if v == model.encoder_dtype)
    source = getattr(model, "source", None)
    if source is not None:
        return source.name, source.checksum, dtype
    digest = hashlib.blake2b(digest_size=16)
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return getattr(model.config, "name", None) or "in-memory", "blake2b:" + digest.hexdigest(), dtype
