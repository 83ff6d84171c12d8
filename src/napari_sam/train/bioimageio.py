"""Sharing a model as a bioimage.io model package: writing one, and testing it with
bioimage.io's own runner.

A package (a .zip) holds ``rdf.yaml`` (the description,
:mod:`~napari_sam.train.bioimageio_description`), the weights as a PyTorch state dict
under the official SAM parameter names, a test input with the output this model computed
for it, a README, a cover picture and a conda environment file
(:mod:`~napari_sam.train.bioimageio_content`). The network is
:class:`~napari_sam.model.bioimageio_model.BoxPromptedSam`, built from the configuration
in ``weights.pytorch_state_dict.architecture.kwargs``; napari-sam's own metadata
(configuration, training provenance, advice) travels under ``config.napari_sam``.
:func:`~napari_sam.train.bioimageio_import.import_bioimageio` reads packages back.

``bioimageio.spec`` and ``bioimageio.core`` are optional dependencies, imported on first
use.
"""

from __future__ import annotations

import gc
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch

from ..core.outputs import check_folder_writable, check_not_an_input
from ..core.preprocess import Normalization
from ..model import Sam, check_state_dict, config_to_dict, sam_from_state_dict
from ..model.bioimageio_model import BoxPromptedSam
from ..model.model_source import file_sha256
from .bioimageio_content import make_cover, make_readme, make_test_sample
from .bioimageio_description import (
    DECODER_FILE,
    MASK_REFINER_FILE,
    NAME_CHARACTERS,
    PACKAGE_FORMAT,
    WEIGHTS_FILE,
    check_licence,
    check_name,
    first_error,
    model_description,
    training_data_description,
)

__all__ = ["INSTALL_HINT", "export_bioimageio", "require_bioimageio", "validate_bioimageio"]

PathLike = Union[str, "os.PathLike[str]"]

INSTALL_HINT = 'pip install "napari-sam-scale[bioimageio]" (or: pip install bioimageio.core)'
_DEFAULT_AUTHORS = ("napari-sam developers",)
_DEFAULT_LICENCE = "BSD-3-Clause"  # the package's: the default model ships inside it


def require_bioimageio(core: bool = False) -> None:
    """Import bioimageio.spec (and bioimageio.core) or say in one line how to install them.

    Raises
    ------
    ImportError
        With the pip command, when they are missing.
    """
    try:
        import bioimageio.spec  # noqa: F401

        if core:
            import bioimageio.core  # noqa: F401
    except ImportError as err:
        raise ImportError(f"bioimage.io packages need bioimageio.core and bioimageio.spec ({err}); install them "
                          f"with: {INSTALL_HINT}") from None


def _is_default_model(model: Sam) -> bool:
    from ..core.models import DEFAULT_CHECKPOINT

    src = model.source
    return src is not None and Path(src.path).resolve() == DEFAULT_CHECKPOINT.resolve()


def _default_name(model: Sam, checkpoint: Any) -> str:
    stem = Path(os.fspath(checkpoint)).stem if isinstance(checkpoint, (str, os.PathLike)) else model.config.name
    cleaned = "".join(c if c in NAME_CHARACTERS else "-" for c in f"napari-sam {stem}")
    return cleaned[:64]


def _normalization(metadata: Mapping[str, Any]) -> Normalization:
    """The intensity mapping the model was trained with (the predictor's default otherwise)."""
    training = metadata.get("training")
    settings = training.get("settings") if isinstance(training, Mapping) else None
    norm = settings.get("normalization") if isinstance(settings, Mapping) else None
    if not isinstance(norm, Mapping):
        return Normalization()
    limits = norm.get("limits")
    return Normalization(mode=norm.get("mode", "auto"), low=norm.get("low", 1.0), high=norm.get("high", 99.8),
                         limits=None if limits is None else (float(limits[0]), float(limits[1])))


def export_bioimageio(
    checkpoint: Sam | PathLike,
    out: PathLike,
    *,
    name: str | None = None,
    description: str | None = None,
    authors: Sequence[str] | None = None,
    license: str | None = None,
    training_data: str | Mapping[str, str] | None = None,
    test_image: np.ndarray | PathLike | None = None,
    test_boxes: np.ndarray | Sequence[Sequence[float]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model as a bioimage.io model package.

    Parameters
    ----------
    checkpoint
        What ``--model`` takes (a checkpoint file, a registry name, ``"default"``) or a
        loaded :class:`~napari_sam.model.Sam`.
    out
        The package to write (``.zip``), in an existing folder.
    name, description
        Shown by bioimage.io; default: from the checkpoint's name and training provenance.
    authors
        Names of the people who made the model; default: ``metadata["authors"]``, or the
        package's developers for the default model. Required otherwise.
    license
        SPDX identifier of the model's licence; default: ``metadata["license"]``, or
        BSD-3-Clause (the package's) for the default model. Required otherwise.
    training_data
        A bioimage.io dataset id, or ``{"name", "description", "license"}`` overriding the
        description made from the checkpoint's provenance (which data sets, their licences).
    test_image
        The test input: one 2D plane (array or image file); default: a window of the nuclei
        sample shipped with the package, prompted with the boxes of its largest nuclei.
    test_boxes
        (N, 4) ``(x0, y0, x1, y1)`` in pixels of ``test_image``; default: boxes around its
        largest bright objects.
    overwrite
        Replace ``out`` if it exists.

    Returns
    -------
    Path
        ``out``, written atomically and validated by ``bioimageio.spec`` on writing (the file
        hashes, the test tensors' shapes against the axes).

    Raises
    ------
    ValueError
        For a bad name, licence or test input, an unknown model, or a checkpoint without a
        licence or authors when none is given.
    FileExistsError
        When ``out`` exists and ``overwrite`` is false.
    ImportError
        When bioimageio.spec is not installed (with the pip command).
    """
    from .. import __version__
    from ..core.models import resolve_model

    require_bioimageio()
    target = Path(out).expanduser()
    if target.suffix.lower() != ".zip":
        raise ValueError(f"out {out}: a bioimage.io package is written as a .zip file")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a folder, not a package file")
    if isinstance(checkpoint, (str, os.PathLike)) and Path(os.fspath(checkpoint)).expanduser().exists():
        check_not_an_input(target, {"checkpoint": checkpoint}, what="out")
    check_folder_writable(target.parent)

    model = resolve_model(checkpoint, device="cpu", dtype="float32")
    decoder = getattr(model, "instance_decoder", None)  # travels as an attachment (DECODER_FILE)
    refiner = getattr(model, "mask_refiner", None)  # and so does this (MASK_REFINER_FILE)
    metadata = dict(model.metadata)
    default = _is_default_model(model)
    licence = license or metadata.get("license") or (_DEFAULT_LICENCE if default else None)
    if not licence:
        raise ValueError("the checkpoint records no licence: give one (license=..., --license), an SPDX identifier "
                         "such as CC-BY-4.0, that the model's base weights and training data allow")
    check_licence(licence)
    names = list(authors or metadata.get("authors") or (_DEFAULT_AUTHORS if default else []))
    if not names:
        raise ValueError("the checkpoint records no authors: name them (authors=[...], --author NAME)")
    bad = [a for a in names if not isinstance(a, str) or not a.strip() or "/" in a]
    if bad:
        raise ValueError(f"author {bad[0]!r}: a name must be non-empty text without '/'")
    name = check_name(name or _default_name(model, checkpoint))
    # the file holds float32 (what consumers load); a float32 CPU model shares its tensors here
    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    config = config_to_dict(model.config)
    with torch.device("meta"):  # the network consumers build from the package must take the weights
        check_state_dict(BoxPromptedSam(**config).state_dict(), state, "the package's network")
    if model.device.type != "cpu" or model.encoder_dtype != torch.float32 or model.training:
        model = sam_from_state_dict(state, model.config)  # the test output of exactly these weights
    normalization = _normalization(metadata)
    sample = make_test_sample(model, normalization, test_image, test_boxes)
    data_descr, data = training_data_description(metadata, training_data)
    if description is None:
        training = metadata.get("training") if isinstance(metadata.get("training"), Mapping) else None
        description = (f"Segment Anything ({model.config.name}) for interactive segmentation from box prompts"
                       + (f", trained with napari-sam ({training.get('mode')} mode, {training.get('steps')} steps)"
                          if training else "") + ".")

    napari = {
        "package_format": PACKAGE_FORMAT,
        "napari_sam_version": __version__,
        "config": config,
        "metadata": metadata,
        "preprocessing": {
            "normalization": {"mode": normalization.mode, "low": normalization.low, "high": normalization.high,
                              "limits": None if normalization.limits is None else list(normalization.limits)},
            "image_size": model.config.image_size,
            "resize": "longest side to image_size, bilinear, antialiased when shrinking",
            "pad": "bottom and right, with the pixel mean",
            "pixel_mean": list(model.config.pixel_mean),
            "pixel_std": list(model.config.pixel_std),
        },
        "source": None if model.source is None else {"name": model.source.name, "checksum": model.source.checksum},
    }
    readme = make_readme(name, description, model, metadata, normalization, licence, data, __version__)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        folder = Path(tmp)
        torch.save(state, folder / WEIGHTS_FILE)
        # our heads beside SAM travel as attachments that bioimage.io's runner leaves alone
        for key, head, file in (("instance_decoder", decoder, DECODER_FILE),
                                ("mask_refiner", refiner, MASK_REFINER_FILE)):
            if head is not None:
                torch.save({k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu()
                            for k, v in head.state_dict().items()}, folder / file)
                napari[key] = {"file": file, "sha256": file_sha256(folder / file)}
        for file, array in (("test_image.npy", sample.image), ("test_box.npy", sample.box),
                            ("test_masks.npy", sample.masks), ("test_iou.npy", sample.iou)):
            np.save(folder / file, array)
        (folder / "README.md").write_text(readme, encoding="utf-8")
        import imageio.v3 as iio

        iio.imwrite(folder / "cover.png", make_cover(sample))
        (folder / "environment.yaml").write_text(_environment(__version__), encoding="utf-8")
        from bioimageio.spec import save_bioimageio_package

        staged = folder / "package.zip"
        problem = None
        with warnings.catch_warnings():
            # bioimageio leaves the readers of the files it validates to the garbage collector:
            # collected below, before the staging folder goes (open files block that on Windows)
            warnings.simplefilter("ignore", ResourceWarning)
            descr = model_description(folder, name=name, description=description, authors=names, licence=licence,
                                      config=config, napari=napari, training_data=data_descr, sample=sample,
                                      model=model)
            try:
                save_bioimageio_package(descr, output_path=staged)
            except ValueError as err:
                problem = first_error(err)
            del descr
            gc.collect()
        if problem is not None:
            raise ValueError(f"the package for {name!r} did not validate: {problem}")
        os.replace(staged, target)
    return target


def _environment(version: str) -> str:
    """The conda environment a consumer needs: the network is imported from napari-sam."""
    return ("name: napari-sam\nchannels:\n  - conda-forge\n  - nodefaults\ndependencies:\n  - python>=3.10\n"
            "  - pytorch>=2.1\n  - pip\n  - pip:\n"
            f"      - napari-sam-scale>={version}\n")


def validate_bioimageio(package: PathLike, devices: Sequence[str] | None = ("cpu",)) -> tuple[bool, list[str]]:
    """Test a package with bioimage.io's own runner: validate its description and files,
    run the model on the test input, compare with the test output (within the package's
    tolerances), and run it for other batch sizes and numbers of boxes.

    Parameters
    ----------
    package
        A package file.
    devices
        Where bioimage.io runs the model (default: the CPU).

    Returns
    -------
    passed : bool
    lines : list of str
        One line per check: its status, its name and its first error.
    """
    require_bioimageio(core=True)
    import zipfile

    from bioimageio.core import test_model
    from bioimageio.spec import InvalidDescr, load_description

    path = Path(package).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no package file at {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a bioimage.io model package (not a .zip file)")
    # opened here so that it is closed here: bioimageio would leave it to the garbage collector
    with zipfile.ZipFile(path) as archive:
        descr = load_description(archive, perform_io_checks=True)
        summary = descr.validation_summary if isinstance(descr, InvalidDescr) else test_model(
            descr, devices=list(devices) if devices else None)
    lines = [f"{d.status:7s} {d.name}" + (f": {' '.join(d.errors[0].msg.split())[:300]}" if d.errors else "")
             for d in summary.details]
    return summary.status == "passed", lines
