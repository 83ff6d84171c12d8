"""Reading a bioimage.io model package back into a checkpoint that ``load_model`` loads.

A package is untrusted input. It is validated with ``bioimageio.spec`` (its description,
and the sha256 of every file it names), its weights are hashed again while they are
copied out and read with ``torch.load(weights_only=True)`` (never unpickled), and the
network is built by napari-sam from the configuration, never imported from whatever
module the package names.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

from ..core.outputs import check_file_output
from ..model import config_from_dict, config_to_dict, infer_config, sam_from_state_dict
from ..model.checkpoint import METADATA_KEY, CheckpointError, read_checkpoint, write_checkpoint
from ..model.decoder_checkpoint import DECODER_KEY, read_decoder_state
from ..model.instance_decoder import instance_decoder_from_state_dict
from ..model.mask_refiner import MASK_REFINER_KEY, mask_refiner_from_state_dict
from .bioimageio import PathLike, require_bioimageio
from .bioimageio_description import ARCHITECTURE, PACKAGE_FORMAT

__all__ = ["import_bioimageio", "read_package"]


def _first_problem(summary: Any) -> str:
    for detail in summary.details:
        for entry in detail.errors:
            where = ".".join(str(p) for p in entry.loc)
            return f"{where}: {' '.join(entry.msg.split())}" if where else " ".join(entry.msg.split())
    return f"status {summary.status}"


def _missing_files(package: Path) -> list[str]:
    """The package files that rdf.yaml names but the zip lacks (bioimageio reports those obscurely)."""
    from ruyaml import YAML

    names: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            source = node.get("source")
            if isinstance(source, str) and "://" not in source:
                names.append(source)
            for key, value in node.items():
                if key != "config":  # tools' own data, where "source" means anything
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    try:
        with zipfile.ZipFile(package) as archive:
            walk(YAML(typ="safe").load(archive.read("rdf.yaml")))
            present = set(archive.namelist())
    except Exception:  # unreadable: bioimageio's own message says more
        return []
    return [n for n in names if n not in present]


def read_package(package: PathLike):
    """Validate a package with ``bioimageio.spec`` and return its model description.

    Parameters
    ----------
    package
        A bioimage.io package file (.zip).

    Returns
    -------
    bioimageio.spec.model.v0_5.ModelDescr
        Older formats are converted to the latest.

    Raises
    ------
    ValueError
        Naming the file and the first problem: not a zip, not a bioimage.io package, an
        invalid description or file (a sha256 that does not match included), not a model.
    FileNotFoundError
        When the file does not exist.
    """
    require_bioimageio()
    from bioimageio.spec import InvalidDescr, load_description
    from bioimageio.spec.model import v0_5

    path = Path(package).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no package file at {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a bioimage.io model package (not a .zip file)")
    problem = None
    # bioimageio's description of a package keeps the zip file open until garbage collection
    # (which would also keep it from being deleted on Windows): it gets one that is closed here
    with zipfile.ZipFile(path) as archive:
        try:
            descr = load_description(archive, perform_io_checks=True, format_version="latest")
        except Exception as err:  # a zip without rdf.yaml, a YAML syntax error, ...
            problem = " ".join(str(err).split())[:300]  # raised below, once the traceback's frames are gone
    if problem is not None:
        raise ValueError(f"{path} is not a readable bioimage.io package: {problem}")
    if isinstance(descr, InvalidDescr):
        missing = _missing_files(path)
        problem = (f"{missing[0]}, named in rdf.yaml, is missing from the package" if missing
                   else _first_problem(descr.validation_summary))
        raise ValueError(f"{path} failed bioimage.io validation: {problem}")
    if not isinstance(descr, v0_5.ModelDescr):
        raise ValueError(f"{path} describes a {descr.type}, not a model")
    return descr


_MAX_MEMBER = 8 << 30
"""Bytes any file of a package may unpack to (SAM ViT-H's weights are 2.6 GB)."""
_MAX_RATIO = 50
"""How much a large file may shrink in the zip: weights shrink little, zeros a thousand-fold."""


def _check_sizes(package: Path) -> None:
    """Refuse, before anything is unpacked, a package whose files would unpack to far more
    than weights take (a zip bomb fills the disk beside ``--out``)."""
    if not zipfile.is_zipfile(package):
        return  # read_package names what it is
    with zipfile.ZipFile(package) as archive:
        for info in archive.infolist():
            ratio = info.file_size / max(1, info.compress_size)
            if info.file_size > _MAX_MEMBER or (info.file_size > 64 << 20 and ratio > _MAX_RATIO):
                raise ValueError(f"{package}: {info.filename} would unpack to {info.file_size / 2**20:.0f} MiB from "
                                 f"{info.compress_size / 2**20:.1f} MiB: not model weights, refused")


def _copy_weights(package: Path, member: str, sha256: str, folder: Path, what: str = "weights file") -> Path:
    """Copy the weights out of the zip into ``folder``, checking their sha256 on the way."""
    digest = hashlib.sha256()
    fd, name = tempfile.mkstemp(prefix=".weights-", suffix=".pt", dir=folder)
    try:
        with zipfile.ZipFile(package) as archive, os.fdopen(fd, "wb") as dst:
            if member not in archive.namelist():
                raise ValueError(f"{package}: its {what} {member} is missing from the package")
            with archive.open(member) as src:
                for block in iter(lambda: src.read(1 << 22), b""):
                    digest.update(block)
                    dst.write(block)
        if digest.hexdigest() != sha256.lower():
            raise ValueError(f"{package}: the {what} {member} does not match its sha256 in rdf.yaml (damaged "
                             f"or altered): refused")
    except BaseException:
        os.remove(name)
        raise
    return Path(name)


def import_bioimageio(package: PathLike, out: PathLike | None = None, *, overwrite: bool = False) -> Path:
    """Turn a bioimage.io model package into a napari-sam checkpoint.

    Parameters
    ----------
    package
        A package written by :func:`~napari_sam.train.bioimageio.export_bioimageio`, or any
        bioimage.io model whose ``pytorch_state_dict`` weights are a SAM state dict in the
        official key layout.
    out
        The checkpoint to write (``.pth``/``.pt``); default: beside the package, named after it.
    overwrite
        Replace ``out`` if it exists.

    Returns
    -------
    Path
        ``out``: the weights under the official keys with napari-sam's metadata
        (configuration, training provenance) as the package carries it; it loads with
        :func:`~napari_sam.core.models.load_model`.

    Raises
    ------
    ValueError
        For a file that is not a valid model package, has no ``pytorch_state_dict`` weights,
        whose weights do not match their sha256, are no SAM or do not fit the configuration
        the package gives, or that was written by a newer napari-sam.
    FileExistsError
        When ``out`` exists and ``overwrite`` is false.
    ImportError
        When bioimageio.spec is not installed (with the pip command).
    """
    src = Path(package).expanduser()
    if out is None:
        stem = src.name[: -len(".bioimageio.zip")] if src.name.endswith(".bioimageio.zip") else src.stem
        target = src.with_name(stem + ".pth")
    else:
        target = Path(out).expanduser()
    target = check_file_output(target, (".pth", ".pt"), "a checkpoint", "out", {"package": src}, overwrite)

    _check_sizes(src)
    descr = read_package(src)
    entry = descr.weights.pytorch_state_dict
    if entry is None:
        formats = ", ".join(descr.weights.available_formats) or "none"
        raise ValueError(f"{src} holds no pytorch_state_dict weights (it has: {formats}); napari-sam reads SAM state "
                         f"dicts only")
    if entry.sha256 is None:
        raise ValueError(f"{src}: rdf.yaml gives no sha256 for its weights, so they cannot be checked: refused")
    extra = descr.config.model_extra or {}
    ours = extra.get(METADATA_KEY)
    if ours is not None:
        if not isinstance(ours, Mapping) or not isinstance(ours.get("config"), Mapping):
            raise ValueError(f"{src}: config.{METADATA_KEY} is not napari-sam's (it has no configuration)")
        if not isinstance(ours.get("package_format", 0), int) or ours.get("package_format", 0) > PACKAGE_FORMAT:
            raise ValueError(f"{src} was written by a newer napari-sam (package format {ours.get('package_format')}, "
                             f"this one reads up to {PACKAGE_FORMAT}): update napari-sam")
        arch = entry.architecture
        named = (getattr(arch, "import_from", None), str(arch.callable))
        if named != ARCHITECTURE or dict(arch.kwargs) != dict(ours["config"]):
            raise ValueError(f"{src}: its architecture ({'.'.join(str(n) for n in named)}) or its arguments differ "
                             f"from the napari-sam configuration it carries: refused")

    member = str(entry.source)
    staged = _copy_weights(src, member, entry.sha256, target.parent)
    try:
        checkpoint = read_checkpoint(staged)  # weights_only=True: tensors and plain values, nothing executed
    except CheckpointError as err:
        raise ValueError(f"{src}: {str(err).replace(str(staged), member)}") from None
    finally:
        os.remove(staged)
    state = checkpoint.state_dict
    try:
        inferred = infer_config(state)
    except ValueError as err:
        raise ValueError(f"{src}: its weights are not a SAM state dict in the official layout ({err})") from None
    if ours is not None:
        try:
            config = config_from_dict(ours["config"])
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"{src}: config.{METADATA_KEY}.config is not a SAM configuration ({err})") from None
        metadata = dict(ours.get("metadata") or {})
    else:
        config, metadata = inferred, {}
    try:
        sam_from_state_dict(state, config)  # every key and shape must fit, or the error names them
    except CheckpointError as err:
        raise ValueError(f"{src}: {err}") from None
    if "config" not in metadata and inferred != config:
        metadata["config"] = config_to_dict(config)  # shapes alone would not tell load_model
    # The package's licence and authors travel with the weights: a model exported again
    # keeps them instead of asking anew (and cannot change licence unnoticed).
    metadata.setdefault("license", str(descr.license))
    metadata.setdefault("authors", [str(a.name) for a in descr.authors])
    extras = {}
    for key, extra, what in (("instance_decoder", DECODER_KEY, "instance decoder"),
                             ("mask_refiner", MASK_REFINER_KEY, "mask refiner")):
        head = _attached_head(src, ours, target.parent, key, what)
        if head is not None:
            extras[extra] = head
    write_checkpoint(target, state, metadata, extras=extras or None)
    return target


def _read_head(path: Path, key: str) -> dict:
    """A head's tensors, read without unpickling; every key and shape checked by building it."""
    if key == "instance_decoder":
        state = read_decoder_state(path)
        instance_decoder_from_state_dict(state)
        return state
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a refused pickle or a damaged file: named below
        raise CheckpointError(f"{path} is not a file of tensors ({type(err).__name__})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    mask_refiner_from_state_dict(state)
    return dict(state)


def _attached_head(src: Path, ours: Mapping | None, folder: Path, key: str, what: str) -> dict | None:
    """A head our export attached (``config.napari_sam.<key>``: the instance decoder, the mask
    refiner), checked against its sha256 and read without unpickling; None when there is none."""
    entry = None if ours is None else ours.get(key)
    if entry is None:
        return None
    if not isinstance(entry, Mapping) or not isinstance(entry.get("file"), str) \
            or not isinstance(entry.get("sha256"), str):
        raise ValueError(f"{src}: config.{METADATA_KEY}.{key} names no file with its sha256")
    staged = _copy_weights(src, entry["file"], entry["sha256"], folder, f"{what} file")
    try:
        return _read_head(staged, key)  # every key and shape must fit, or the error names them
    except (CheckpointError, ValueError) as err:
        raise ValueError(f"{src}: its {what}: {str(err).replace(str(staged), entry['file'])}") from None
    finally:
        os.remove(staged)

