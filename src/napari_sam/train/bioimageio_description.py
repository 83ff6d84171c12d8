"""The description of a napari-sam bioimage.io package (its ``rdf.yaml``): the tensors,
the weights and the network that reads them, the citation, the licence, the training data
and the tolerances of the package's test.

Nothing here needs the network: the description names no URL (a DOI is checked by its
form only) and no GitHub user, the fields that bioimage.io checks online.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..model import Sam
from ..model.checkpoint import METADATA_KEY
from .bioimageio_content import PackageSample, describe_training_data

__all__ = ["ARCHITECTURE", "DECODER_FILE", "MASK_REFINER_FILE", "PACKAGE_FORMAT", "WEIGHTS_FILE", "check_licence",
           "check_name", "first_error", "model_description", "training_data_description"]

ARCHITECTURE = ("napari_sam.model.bioimageio_model", "BoxPromptedSam")
"""Where bioimage.io consumers import the network from (module, callable)."""
PACKAGE_FORMAT = 1
"""Version of the layout of ``config.napari_sam`` in our packages."""
WEIGHTS_FILE = "weights.pt"
DECODER_FILE = "instance_decoder.pt"
MASK_REFINER_FILE = "mask_refiner.pt"
"""The instance decoder (automatic segmentation) of a model that has one: an attachment
that napari-sam's import puts back; bioimage.io's runner uses the SAM weights only."""

_SAM_CITATION = ("Kirillov, A. et al. Segment Anything. ICCV 2023.", "10.48550/arXiv.2304.02643")
_MOBILE_SAM_CITATION = ("Zhang, C. et al. Faster Segment Anything: Towards Lightweight SAM for Mobile "
                        "Applications. 2023.", "10.48550/arXiv.2306.14289")
NAME_CHARACTERS = frozenset(string.ascii_letters + string.digits + "_+- ()")
"""The characters bioimage.io allows in a name."""


def check_licence(licence: str, what: str = "license") -> str:
    """``licence`` if it is an SPDX identifier bioimage.io knows, else a ValueError naming ``what``."""
    from bioimageio.spec.generic.v0_3 import LicenseId

    try:
        LicenseId(licence)
    except Exception:
        raise ValueError(f"{what} {licence!r} is not an SPDX licence identifier (such as CC-BY-4.0, MIT or "
                         f"BSD-3-Clause; see https://spdx.org/licenses)") from None
    return licence


def check_name(name: str) -> str:
    """``name`` if bioimage.io accepts it as a name, else a ValueError saying why."""
    bad = sorted(set(name) - NAME_CHARACTERS)
    if bad or not 5 <= len(name) <= 128:
        raise ValueError(f"name {name!r}: bioimage.io takes 5 to 128 letters, digits, spaces and _+-() "
                         + (f"(not {''.join(bad)!r})" if bad else f"(it has {len(name)} characters)"))
    return name


def _tolerances(masks: np.ndarray, iou: np.ndarray) -> list[dict[str, Any]]:
    """Tolerances of the test: other hardware and thread counts change the last digits,
    and a pixel on a mask's edge may flip under bilinear upsampling. bioimage.io accepts an
    absolute tolerance of at most 1 % of the largest test value."""
    out = []
    for tensor_id, values, atol, ppm in (("masks", masks, 1e-2, 1000), ("iou", iou, 1e-3, 0)):
        atol = float(max(0.0, min(atol, 0.01 * float(values.max()))))
        out.append(dict(output_ids=[tensor_id], relative_tolerance=1e-3, absolute_tolerance=atol,
                        mismatched_elements_per_million=ppm))
    return out


def training_data_description(metadata: Mapping[str, Any], given: str | Mapping[str, str] | None):
    """The ``training_data`` field and the provenance it was made from.

    Parameters
    ----------
    metadata
        The checkpoint's metadata.
    given
        A bioimage.io dataset id, ``{"name", "description", "license"}`` overriding what the
        provenance says, or None.

    Returns
    -------
    field : LinkedDataset, DatasetDescr or None
    described : dict or None
        :func:`~napari_sam.train.bioimageio_content.describe_training_data` of ``metadata``.
    """
    from bioimageio.spec.dataset.v0_3 import DatasetDescr, LinkedDataset
    from pydantic import ValidationError

    if isinstance(given, str):
        try:
            return LinkedDataset(id=given), describe_training_data(metadata)
        except ValidationError:
            raise ValueError(f"training_data {given!r} is not a bioimage.io dataset id") from None
    described = describe_training_data(metadata)
    if given is None and described is None:
        return None, None
    given = dict(given or {})
    unknown = set(given) - {"name", "description", "license"}
    if unknown:
        raise ValueError(f"training_data: unknown key(s) {sorted(unknown)}; give name, description and license, or a "
                         f"bioimage.io dataset id")
    licences = (described or {}).get("licenses", [])
    licence = given.get("license") or (licences[0] if len(licences) == 1 else None)
    if licence is not None:
        try:
            licence = check_licence(licence, "training data license")
        except ValueError:
            if "license" in given:
                raise
            licence = None  # recorded as text (e.g. "research use with citation"): stays in the description
    text = given.get("description") or (described or {}).get("description") or "not described"
    name = given.get("name") or "napari-sam training data"
    return DatasetDescr(name=check_name(name), description=text[:1024], license=licence), described


def first_error(err: Exception) -> str:
    """The first problem a (pydantic) validation error reports, on one line."""
    errors = getattr(err, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg')}"
    return " ".join(str(err).split())


def model_description(
    folder: Path,
    *,
    name: str,
    description: str,
    authors: Sequence[str],
    licence: str,
    config: Mapping[str, Any],
    napari: Mapping[str, Any],
    training_data: Any,
    sample: PackageSample,
    model: Sam,
):
    """The model description (``rdf.yaml``) over the files staged in ``folder``.

    Parameters
    ----------
    folder
        Holds the weights, the test tensors, ``README.md``, ``cover.png`` and
        ``environment.yaml``.
    name, description, authors, licence
        As bioimage.io shows them (already checked).
    config
        The network's configuration (``architecture.kwargs``).
    napari
        What goes under ``config.napari_sam``.
    training_data
        The ``training_data`` field (see :func:`training_data_description`).
    sample
        The test tensors (for the test's tolerances).
    model
        The model (for its parameter count and input size).

    Returns
    -------
    bioimageio.spec.model.v0_5.ModelDescr

    Raises
    ------
    ValueError
        With the first problem bioimage.io's validation finds.
    """
    from bioimageio.spec.model import v0_5 as bio
    from pydantic import ValidationError

    A, T = bio.AxisId, bio.TensorId
    size = model.config.image_size

    def ref(tensor: str, axis: str):
        return bio.SizeReference(tensor_id=T(tensor), axis_id=A(axis))

    def file(name: str):
        return bio.FileDescr(source=folder / name)

    try:
        inputs = [
            bio.InputTensorDescr(
                id=T("image"),
                description="RGB 0-255, longest side resized to the model input, padded with the pixel mean",
                axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=["red", "green", "blue"]),
                      bio.SpaceInputAxis(id=A("y"), size=size), bio.SpaceInputAxis(id=A("x"), size=size)],
                data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, 255.0)),
                preprocessing=[bio.FixedZeroMeanUnitVarianceDescr(kwargs=bio.FixedZeroMeanUnitVarianceAlongAxisKwargs(
                    axis=A("channel"), mean=list(model.config.pixel_mean), std=list(model.config.pixel_std)))],
                test_tensor=file("test_image.npy"),
            ),
            bio.InputTensorDescr(
                id=T("box"),
                description="one box per object: (x0, y0, x1, y1) in pixels of the model input",
                axes=[bio.BatchAxis(), bio.IndexInputAxis(id=A("object"), size=bio.ParameterizedSize(min=1, step=1)),
                      bio.ChannelAxis(id=A("coordinate"), channel_names=["x0", "y0", "x1", "y1"])],
                test_tensor=file("test_box.npy"),
            ),
        ]
        outputs = [
            bio.OutputTensorDescr(
                id=T("masks"), description="mask logits in the model-input frame; the mask is masks > 0",
                axes=[bio.BatchAxis(), bio.IndexOutputAxis(id=A("object"), size=ref("box", "object")),
                      bio.SpaceOutputAxis(id=A("y"), size=ref("image", "y")),
                      bio.SpaceOutputAxis(id=A("x"), size=ref("image", "x"))],
                test_tensor=file("test_masks.npy"),
            ),
            bio.OutputTensorDescr(
                id=T("iou"), description="predicted IoU of each mask",
                axes=[bio.BatchAxis(), bio.IndexOutputAxis(id=A("object"), size=ref("box", "object"))],
                test_tensor=file("test_iou.npy"),
            ),
        ]
        weights = bio.WeightsDescr(pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
            source=folder / WEIGHTS_FILE,
            architecture=bio.ArchitectureFromLibraryDescr(import_from=ARCHITECTURE[0], callable=ARCHITECTURE[1],
                                                          kwargs=config),
            pytorch_version=bio.Version(torch.__version__.split("+")[0]),
            dependencies=file("environment.yaml"),
            comment="official SAM parameter names (image_encoder.*, prompt_encoder.*, mask_decoder.*)",
        ))
        cite = [bio.CiteEntry(text=_SAM_CITATION[0], doi=_SAM_CITATION[1])]
        if "embed_dims" in config["encoder"]:
            cite.append(bio.CiteEntry(text=_MOBILE_SAM_CITATION[0], doi=_MOBILE_SAM_CITATION[1]))
        training = napari["metadata"].get("training") if isinstance(napari["metadata"].get("training"), Mapping) \
            else {}
        settings = training.get("settings") if isinstance(training.get("settings"), Mapping) else {}
        return bio.ModelDescr(
            name=name, description=description, authors=[bio.Author(name=a) for a in authors], license=licence,
            cite=cite, documentation=file("README.md"), covers=[file("cover.png")],
            tags=["segment-anything", "sam", "napari-sam", "interactive-segmentation", "instance-segmentation",
                  "2d", "pytorch", "vision-transformer"],
            inputs=inputs, outputs=outputs, weights=weights, training_data=training_data,
            attachments=[file(f) for f in (DECODER_FILE, MASK_REFINER_FILE) if (folder / f).is_file()],
            config={METADATA_KEY: napari, "bioimageio": {
                "reproducibility_tolerance": _tolerances(sample.masks, sample.iou),
                "architecture_type": "transformer",
                "architecture_description": "Segment Anything: an image encoder, a prompt encoder and a mask "
                                            "decoder (two-way transformer); box prompts",
                "task": "interactive instance segmentation",
                "model_parameter_count": int(sum(p.numel() for p in model.parameters())),
                "training": {k: v for k, v in {
                    "optimizer": "torch.optim.AdamW" if training else None,
                    "initial_learning_rate": settings.get("learning_rate"),
                    "learning_rate_schedule": settings.get("schedule"),
                    "loss_function": "focal + dice on the masks, mean squared error on the predicted IoU"
                    if training else None,
                    "training_batch_size": settings.get("images_per_step"),
                }.items() if v is not None},
            }},
        )
    except ValidationError as err:
        raise ValueError(f"the package description is not valid: {first_error(err)}") from None
