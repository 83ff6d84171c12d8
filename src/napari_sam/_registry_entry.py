"""What a registry entry is: a downloadable checkpoint (:class:`ModelEntry`) and, for
micro-sam's models, its instance decoder as a file of its own (:class:`DecoderFile`), each
validated when made; and the model families a checkpoint belongs to (:data:`FAMILIES`).
:mod:`napari_sam.weights` holds the entries, the cache and the download.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Optional

__all__ = ["ENCODERS", "FAMILIES", "DecoderFile", "ModelEntry", "family_of"]

FAMILIES: Mapping[str, frozenset[str]] = MappingProxyType({
    "sam": frozenset({"vit_b", "vit_l", "vit_h", "vit_t"}),
    "sam2": frozenset({"sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large"}),
})
"""The model families, each with the configurations its checkpoints are built on.

``"sam"``: Segment Anything (ViT and MobileSAM's TinyViT encoders), loaded by
``napari_sam.core.models.load_model`` as a ``Sam``. ``"sam2"``: SAM 2.1 (Hiera encoders,
memory for propagation), loaded by ``napari_sam.core.sam2_models.load_sam2_model`` as a
``Sam2``; its names are those of ``napari_sam.model.sam2.CONFIGS``. A checkpoint of one
family never loads as the other: their keys differ."""

ENCODERS = frozenset().union(*FAMILIES.values())
"""Names of every configuration a registry checkpoint can be built on, of any family."""

_HEX_DIGITS = {"sha256": 64, "md5": 32, "xxh128": 32}
"""Hash algorithms a registry entry may use, with the length of their hex digest."""


def family_of(config: str) -> str:
    """The family (a key of :data:`FAMILIES`) of a configuration name.

    Raises
    ------
    ValueError
        For a name that is in no family; the message lists the known ones.
    """
    for family, configs in FAMILIES.items():
        if config in configs:
            return family
    raise ValueError(f"config {config!r} is not one of {sorted(ENCODERS)}")


def _check_file(owner: str, url: str, known_hash: str, filename: str) -> None:
    """ValueError naming ``owner`` for an address, checksum or file name a registry file cannot have."""
    if not url.startswith("https://"):
        raise ValueError(f"{owner}: url must start with https://, not {url!r}")
    algorithm, _, digest = known_hash.partition(":")
    if algorithm not in _HEX_DIGITS:
        raise ValueError(
            f"{owner}: hash algorithm {algorithm!r} is not one of {sorted(_HEX_DIGITS)} "
            f"(write the hash as 'algorithm:hexdigest')"
        )
    if not re.fullmatch(f"[0-9a-f]{{{_HEX_DIGITS[algorithm]}}}", digest):
        raise ValueError(
            f"{owner}: {algorithm} digest must be {_HEX_DIGITS[algorithm]} lower-case hex digits, not {digest!r}"
        )
    if not filename or Path(filename).name != filename:
        raise ValueError(f"{owner}: filename must be a bare file name, not {filename!r}")


@dataclass(frozen=True)
class DecoderFile:
    """A model's instance decoder as a file of its own: its state dict alone (torch-em UNETR
    keys without ``encoder.``); ``url``, ``known_hash`` and ``filename`` as in :class:`ModelEntry`."""

    url: str
    known_hash: str
    filename: str

    def __post_init__(self):
        _check_file("decoder file", self.url, self.known_hash, self.filename)


@dataclass(frozen=True)
class ModelEntry:
    """One downloadable checkpoint.

    Parameters
    ----------
    name
        Registry name, e.g. ``"vit_b_lm"``.
    config
        Configuration the weights fit, which also names their family (:attr:`family`):
        ``"vit_b"``, ``"vit_l"``, ``"vit_h"`` or ``"vit_t"`` for SAM;
        ``"sam2.1_hiera_tiny"``, ``"_small"``, ``"_base_plus"`` or ``"_large"`` for SAM 2.1.
    url
        HTTPS address of the file.
    known_hash
        Checksum in pooch's ``"algorithm:hexdigest"`` form (``sha256``, ``md5`` or
        ``xxh128``; the last needs the ``xxhash`` package).
    filename
        Name of the file in the cache folder.
    description
        One line for menus and ``napari-sam models``.
    licence
        SPDX identifier of the weights' licence.
    homepage
        Where the weights are described and cited from.
    size_bytes
        Size of the file, where known (for progress and disk-space messages).
    decoder
        micro-sam's instance decoder for these weights, when it is a separate file
        (:func:`fetch_decoder`); None when the model has none or carries it in ``url``'s file.
    """

    name: str
    config: str
    url: str
    known_hash: str
    filename: str
    description: str
    licence: str
    homepage: str = ""
    size_bytes: Optional[int] = None
    decoder: Optional[DecoderFile] = None

    def __post_init__(self):
        if self.config not in ENCODERS:
            raise ValueError(f"{self.name}: config {self.config!r} is not one of {sorted(ENCODERS)}")
        if self.decoder is not None and self.family != "sam":
            raise ValueError(f"{self.name}: only SAM checkpoints have an instance decoder file")
        _check_file(self.name, self.url, self.known_hash, self.filename)
        if self.size_bytes is not None and self.size_bytes <= 0:
            raise ValueError(f"{self.name}: size_bytes must be positive")
        if self.decoder is not None and self.decoder.filename == self.filename:
            raise ValueError(f"{self.name}: the decoder file needs a file name of its own")

    @property
    def hash_algorithm(self) -> str:
        """The algorithm part of :attr:`known_hash`, e.g. ``"sha256"``."""
        return self.known_hash.partition(":")[0]

    @property
    def family(self) -> str:
        """The model family of the weights, a key of :data:`FAMILIES`: ``"sam"`` or ``"sam2"``."""
        return family_of(self.config)
