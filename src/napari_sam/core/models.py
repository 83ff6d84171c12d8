"""Loading a SAM by registry name or checkpoint file, onto a device, in a precision; and
which model family (SAM or SAM 2.1) a name or a checkpoint belongs to, so that a checkpoint
of one family given where the other is needed is refused in one line."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Mapping

import torch

from ..model import ModelSource, Sam, config_from_dict, infer_config, sam_from_state_dict
from ..model.sam2 import Sam2
from .runtime import configure_runtime

__all__ = [
    "DEFAULT_MODEL", "DTYPES", "MODEL_ENV_VAR", "default_model_spec", "load_model", "model_choices", "resolve_model",
    "model_identity", "resolve_device", "resolve_dtype", "native_bfloat16", "state_dict_family",
    "family_mismatch", "resolve_checkpoint", "model_family",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Encoder precisions by name. float32 reproduces the official outputs; bfloat16 halves
memory and is about twice as fast where the hardware computes it natively."""


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
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto") from None
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
MODEL_ENV_VAR = "NAPARI_SAM_MODEL"
"""Environment variable naming the model used when none is given (a registry name or a
checkpoint file)."""


def _is_bioimageio_package(path: Path) -> bool:
    """A zip whose top level holds a bioimage.io description (a torch checkpoint is a zip too)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return bool({"rdf.yaml", "bioimageio.yaml"} & set(archive.namelist()))
    except (zipfile.BadZipFile, OSError):
        return False


_SAM2_KEYS = ("sam_mask_decoder.", "memory_attention.", "memory_encoder.")
"""Official key prefixes found only in SAM 2 checkpoints (SAM's decoder is ``mask_decoder.``)."""


def state_dict_family(state_dict: Mapping[str, object]) -> str:
    """The model family of a state dict in official keys (a key of
    :data:`napari_sam.weights.FAMILIES`): ``"sam2"`` when it holds SAM 2's own modules
    (``sam_mask_decoder``, memory attention or encoder), else ``"sam"``."""
    return "sam2" if any(key.startswith(_SAM2_KEYS) for key in state_dict) else "sam"


def family_mismatch(what: str, family: str) -> str:
    """One line saying that ``what`` (a name or file) is a checkpoint of ``family`` and what loads it."""
    if family == "sam2":
        return (f"{what} is a SAM 2.1 checkpoint; it is used for propagation with memory and loads with "
                f"napari_sam.core.sam2_models.load_sam2_model, not as a SAM for prompting planes (load_model)")
    return (f"{what} is a SAM (1) checkpoint, not a SAM 2.1 one; load it with napari_sam.core.models.load_model, "
            f"or choose one of the SAM 2.1 models (`napari-sam models`)")


def resolve_checkpoint(name_or_path: str | os.PathLike, family: str = "sam") -> tuple[str, Path, Path | None]:
    """(name, checkpoint file, separate instance-decoder file or None) of a registry name, the
    shipped default or a file; a registry name of another family is refused before any download.

    Raises
    ------
    ValueError
        For an unknown name, a missing file, a bioimage.io package, or a name of another family.
    """
    from ..weights import REGISTRY, fetch_checkpoint, fetch_decoder, list_models

    text = os.fspath(name_or_path)
    if text == DEFAULT_MODEL:
        if family != "sam":
            raise ValueError(family_mismatch(f"{text!r} (the model shipped with the package)", "sam"))
        if not DEFAULT_CHECKPOINT.is_file():
            raise ValueError(f"the default model is not installed ({DEFAULT_CHECKPOINT} is missing)")
        return DEFAULT_MODEL, DEFAULT_CHECKPOINT, None
    if text in REGISTRY:
        if REGISTRY[text].family != family:
            raise ValueError(family_mismatch(repr(text), REGISTRY[text].family))
        # micro-sam keeps its models' instance decoders in files of their own and fetches
        # both together; so do we (both checksummed, into the cache).
        return text, Path(fetch_checkpoint(text)), fetch_decoder(text)
    path = Path(text).expanduser()
    if path.is_file():
        if _is_bioimageio_package(path):
            raise ValueError(f"{path} is a bioimage.io model package: turn it into a checkpoint first with "
                             f"`napari-sam import {path} --out model.pth` (napari_sam.train.import_bioimageio)")
        return path.name, path, None
    if path.exists():
        raise ValueError(f"{path} is not a checkpoint file")
    names = ([DEFAULT_MODEL] if family == "sam" else []) + sorted(e.name for e in list_models(family))
    # a mistyped SAM 2.1 name (`propagate --model`) reaches the SAM loader first
    sam2 = sorted(e.name for e in list_models("sam2")) if family == "sam" else []
    raise ValueError(f"{text!r} is neither a model name nor an existing checkpoint file. "
                     f"Known model names: {', '.join(names)}" + (f" (SAM 2.1, to propagate: {', '.join(sam2)})"
                                                                  if sam2 else ""))


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
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
        Precision of the image encoder: ``"auto"`` (default: bfloat16 where the hardware
        computes it natively, else float32; the same default as the CLI, the Annotator and
        the widget, so their embedding caches are shared), ``"float32"`` (exact),
        ``"bfloat16"``, ``"float16"`` (GPU only), or None for float32. The prompt encoder
        and mask decoder stay in float32.

    The package's process-wide settings are applied first
    (:func:`~napari_sam.core.runtime.configure_runtime`: glibc keeps freed blocks for
    reuse, and large CPU matrix products go through oneDNN where that is faster).

    Returns
    -------
    Sam
        In evaluation mode, with :attr:`Sam.source` and :attr:`Sam.metadata` set, and
        :attr:`Sam.instance_decoder` when the checkpoint carries micro-sam's
        ``decoder_state`` or the registry lists a decoder file for the model (fetched with
        it; loaded strictly: a decoder that does not fit is an error), and
        :attr:`Sam.mask_refiner` when it carries a ``mask_refiner_state``.

    Raises
    ------
    ValueError
        For an unknown name, a missing file, a SAM 2.1 name or checkpoint (one line saying
        so), or a state dict that does not fit (the error names the missing, unexpected and
        misshapen keys).
    """
    from ..model.checkpoint import file_stat, read_checkpoint
    from ..model.decoder_checkpoint import DECODER_KEY, find_decoder_state, read_decoder_state
    from ..model.instance_decoder import instance_decoder_from_state_dict
    from ..model.mask_refiner import MASK_REFINER_KEY, mask_refiner_from_state_dict

    configure_runtime()
    name, path, decoder_file = resolve_checkpoint(name_or_path, "sam")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    stat = file_stat(path)  # before the read: a file replaced from now on cannot sign this model's caches
    checkpoint = read_checkpoint(path)
    if state_dict_family(checkpoint.state_dict) != "sam":
        raise ValueError(family_mismatch(str(path), "sam2"))
    # Our checkpoints record their configuration (needed for inputs other than 1024 pixels,
    # which shapes alone do not reveal); others are recognised by their shapes.
    stored = checkpoint.metadata.get("config")
    config = config_from_dict(stored) if stored else infer_config(checkpoint.state_dict)
    model = sam_from_state_dict(checkpoint.state_dict, config, device=device)
    model.image_encoder.to(torch_dtype)
    dtype_name = next(k for k, v in DTYPES.items() if v == torch_dtype)
    model.source = ModelSource(name=name, path=str(path), dtype=dtype_name, stat=stat)
    model.metadata = dict(checkpoint.metadata)
    # micro-sam's instance decoder, from the same file (wins, as in micro-sam) or its own;
    # float32 like the mask decoder.
    decoder_state = None
    if DECODER_KEY in checkpoint.extras:
        decoder_state = find_decoder_state(checkpoint.extras, str(path))
    elif decoder_file is not None:
        decoder_state = read_decoder_state(decoder_file)
    if decoder_state is not None:
        model.instance_decoder = instance_decoder_from_state_dict(decoder_state).to(device).eval()
    if MASK_REFINER_KEY in checkpoint.extras:
        model.mask_refiner = mask_refiner_from_state_dict(checkpoint.extras[MASK_REFINER_KEY]).to(device)
    return model


def default_model_spec() -> str | None:
    """The model used when none is named: ``$NAPARI_SAM_MODEL``, else the default model
    shipped with the package, else None."""
    return os.environ.get(MODEL_ENV_VAR) or (DEFAULT_MODEL if DEFAULT_CHECKPOINT.is_file() else None)


def model_choices() -> list[str]:
    """The models a SAM picker offers, in order: ``$NAPARI_SAM_MODEL`` when it names a file
    or an unknown name is not listed otherwise, the shipped default, then the registry's SAM
    models (SAM 2.1 checkpoints do not load as a SAM: :func:`napari_sam.weights.list_models`
    with ``"sam2"`` lists those)."""
    from ..weights import list_models

    names = ([DEFAULT_MODEL] if DEFAULT_CHECKPOINT.is_file() else []) + [e.name for e in list_models("sam")]
    env = os.environ.get(MODEL_ENV_VAR)
    if env and env not in names and not os.path.isfile(env):
        env = None
    return ([env] if env and env not in names else []) + names


def resolve_model(
    model: Sam | str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
) -> Sam:
    """The model a user meant: the one API, widgets and command line share.

    Parameters
    ----------
    model
        A loaded Sam (returned as it is), a registry name or checkpoint file (loaded with
        :func:`load_model`), or None for :func:`default_model_spec`.
    device, dtype
        As for :func:`load_model` (used when the model is loaded here).

    Raises
    ------
    ValueError
        When no model is named and none is configured or shipped, or for the errors of
        :func:`load_model`.
    """
    if isinstance(model, Sam):
        return model
    spec = model if model is not None else default_model_spec()
    if not spec:
        raise ValueError(
            f"no model given: name one (a registry name, see `napari-sam models`, or a checkpoint file), "
            f"or set {MODEL_ENV_VAR}"
        )
    from ..weights import REGISTRY

    named = spec == DEFAULT_MODEL or spec in REGISTRY or Path(spec).expanduser().exists()
    if model is None and os.environ.get(MODEL_ENV_VAR) and not named:
        try:  # a name from the environment that names nothing: say where it came from
            return load_model(spec, device=device, dtype=dtype)
        except ValueError as err:
            raise ValueError(f"${MODEL_ENV_VAR}={spec}: {err}") from err
    return load_model(spec, device=device, dtype=dtype)


def model_identity(model: Sam) -> tuple[str, str, str]:
    """(name, checksum, encoder precision) of a model: what cached embeddings depend on.

    A model loaded from a file is identified by the file's checksum; one built in memory
    (tests, a model being trained) by a hash of its weights.
    """
    dtype = next(k for k, v in DTYPES.items() if v == model.encoder_dtype)
    if model.source is not None:
        return model.source.name, model.source.checksum, dtype
    digest = hashlib.blake2b(digest_size=16)
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return getattr(model.config, "name", None) or "in-memory", "blake2b:" + digest.hexdigest(), dtype


def model_family(spec) -> str:
    """``"sam2"`` for a SAM 2 (a loaded :class:`~napari_sam.model.sam2.Sam2`, a SAM 2.1
    registry name or checkpoint file), else ``"sam"``; a file that cannot be read is left
    for the SAM loader to report."""
    if isinstance(spec, Sam2):
        return "sam2"
    if spec is None or isinstance(spec, torch.nn.Module):
        return "sam"
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"a model is a loaded SAM, a registry name or a checkpoint path, not {type(spec).__name__} "
                        f"{spec!r}")
    from ..weights import REGISTRY

    text = os.fspath(spec)
    if text in REGISTRY:
        return REGISTRY[text].family
    if not os.path.isfile(text):
        return "sam"
    try:  # the keys only: a memory map reads no weights
        state = torch.load(text, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a readable checkpoint: the SAM loader says why
        return "sam"
    if isinstance(state, dict):
        state = next((state[k] for k in ("model", "state_dict") if isinstance(state.get(k), dict)), state)
    return state_dict_family(state) if isinstance(state, dict) else "sam"
