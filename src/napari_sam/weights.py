"""Registry of public SAM checkpoints, the cache they live in, and their download.

Nothing here touches the network until :func:`fetch_checkpoint` is called. Every file is
pinned to a checksum; a file whose checksum does not match is never handed out. Where
the machine is offline, the error says which file to fetch by hand and where to put it.

The cache folder is ``$NAPARI_SAM_CACHE_DIR`` when that variable is set, otherwise the
operating system's user cache folder for ``napari-sam`` (see :func:`cache_dir`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = [
    "CACHE_ENV_VAR",
    "ENCODERS",
    "REGISTRY",
    "CheckpointDownloadError",
    "ChecksumMismatchError",
    "ModelEntry",
    "UnknownModelError",
    "cache_dir",
    "checkpoint_path",
    "fetch_checkpoint",
    "get_entry",
    "list_models",
]

CACHE_ENV_VAR = "NAPARI_SAM_CACHE_DIR"
"""Environment variable that, when set, names the folder checkpoints are cached in."""

ENCODERS = frozenset({"vit_b", "vit_l", "vit_h", "vit_t"})
"""Names of the image-encoder configurations a checkpoint can be built on."""

_HEX_DIGITS = {"sha256": 64, "md5": 32, "xxh128": 32}
"""Hash algorithms a registry entry may use, with the length of their hex digest."""


class UnknownModelError(KeyError, ValueError):
    """A model name that is not in :data:`REGISTRY`.

    It is both a ``KeyError`` (a failed look-up) and a ``ValueError`` (a bad argument),
    so callers may catch either.
    """

    def __str__(self) -> str:
        # KeyError would show the message in quotes.
        return str(self.args[0]) if self.args else ""


class CheckpointDownloadError(RuntimeError):
    """A checkpoint could not be downloaded or verified.

    The message names the URL, the file name, and the path where the file can be placed
    by hand (its checksum is verified the next time it is asked for).
    """


class ChecksumMismatchError(CheckpointDownloadError):
    """A downloaded file's checksum differs from the registry's."""


@dataclass(frozen=True)
class ModelEntry:
    """One downloadable checkpoint.

    Parameters
    ----------
    name
        Registry name, e.g. ``"vit_b_lm"``.
    config
        Image-encoder configuration the weights fit: ``"vit_b"``, ``"vit_l"``,
        ``"vit_h"`` or ``"vit_t"``.
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

    def __post_init__(self):
        if self.config not in ENCODERS:
            raise ValueError(f"{self.name}: config {self.config!r} is not one of {sorted(ENCODERS)}")
        if not self.url.startswith("https://"):
            raise ValueError(f"{self.name}: url must start with https://, not {self.url!r}")
        algorithm, _, digest = self.known_hash.partition(":")
        if algorithm not in _HEX_DIGITS:
            raise ValueError(
                f"{self.name}: hash algorithm {algorithm!r} is not one of {sorted(_HEX_DIGITS)} "
                f"(write the hash as 'algorithm:hexdigest')"
            )
        if not re.fullmatch(f"[0-9a-f]{{{_HEX_DIGITS[algorithm]}}}", digest):
            raise ValueError(
                f"{self.name}: {algorithm} digest must be {_HEX_DIGITS[algorithm]} lower-case hex digits, "
                f"not {digest!r}"
            )
        if not self.filename or Path(self.filename).name != self.filename:
            raise ValueError(f"{self.name}: filename must be a bare file name, not {self.filename!r}")
        if self.size_bytes is not None and self.size_bytes <= 0:
            raise ValueError(f"{self.name}: size_bytes must be positive")

    @property
    def hash_algorithm(self) -> str:
        """The algorithm part of :attr:`known_hash`, e.g. ``"sha256"``."""
        return self.known_hash.partition(":")[0]


_SAM_HOME = "https://github.com/facebookresearch/segment-anything"
_MOBILE_SAM_HOME = "https://github.com/ChaoningZhang/MobileSAM"
_MICRO_SAM_HOME = "https://github.com/computational-cell-analytics/micro-sam"
_BIOIMAGE_IO = "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io"


def _micro_sam(name: str, config: str, model_id: str, version: str, xxh128: str, what: str) -> ModelEntry:
    return ModelEntry(
        name=name,
        config=config,
        url=f"{_BIOIMAGE_IO}/{model_id}/{version}/files/{config}.pt",
        known_hash=f"xxh128:{xxh128}",
        filename=f"micro_sam_{name}_{model_id}_{version}.pt",
        description=f"micro-sam {config}, fine-tuned for {what} (BioImage.IO {model_id} {version})",
        licence="CC-BY-4.0",
        homepage=_MICRO_SAM_HOME,
    )


def _meta_sam(config: str, stem: str, sha256: str, size: int, what: str) -> ModelEntry:
    return ModelEntry(
        name=config,
        config=config,
        url=f"https://dl.fbaipublicfiles.com/segment_anything/{stem}.pth",
        known_hash=f"sha256:{sha256}",
        filename=f"{stem}.pth",
        description=f"Segment Anything {what}",
        licence="Apache-2.0",
        homepage=_SAM_HOME,
        size_bytes=size,
    )


_ENTRIES = (
    _meta_sam(
        "vit_b", "sam_vit_b_01ec64", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375_042_383, "ViT-B (Meta, 91M parameters): the fast general-purpose model",
    ),
    _meta_sam(
        "vit_l", "sam_vit_l_0b3195", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        1_249_524_607, "ViT-L (Meta, 308M parameters)",
    ),
    _meta_sam(
        "vit_h", "sam_vit_h_4b8939", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        2_564_550_879, "ViT-H (Meta, 636M parameters): the most accurate, the slowest",
    ),
    ModelEntry(
        name="vit_t",
        config="vit_t",
        url=(
            "https://github.com/ChaoningZhang/MobileSAM/raw/"
            "f706ad9c4eb7f219c00d9050e46328518ffb65d2/weights/mobile_sam.pt"
        ),
        known_hash="sha256:6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        filename="mobile_sam.pt",
        description="MobileSAM (TinyViT encoder distilled from ViT-H, 10M parameters): for CPUs",
        licence="Apache-2.0",
        homepage=_MOBILE_SAM_HOME,
        size_bytes=40_728_226,
    ),
    _micro_sam("vit_b_lm", "vit_b", "diplomatic-bug", "1.2", "fe9252a29f3f4ea53c15a06de471e186", "light microscopy"),
    _micro_sam("vit_l_lm", "vit_l", "idealistic-rat", "1.2", "017f20677997d628426dec80a8018f9d", "light microscopy"),
    _micro_sam("vit_t_lm", "vit_t", "faithful-chicken", "1.1", "72ec5074774761a6e5c05a08942f981e", "light microscopy"),
    _micro_sam(
        "vit_b_em_organelles", "vit_b", "noisy-ox", "1.2", "f3bf2ed83d691456bae2c3f9a05fb438",
        "electron microscopy organelles (mitochondria, nuclei)",
    ),
    _micro_sam(
        "vit_l_em_organelles", "vit_l", "humorous-crab", "1.2", "810b084b6e51acdbf760a993d8619f2d",
        "electron microscopy organelles (mitochondria, nuclei)",
    ),
    _micro_sam(
        "vit_t_em_organelles", "vit_t", "greedy-whale", "1", "253474720c497cce605e57c9b1d18fd9",
        "electron microscopy organelles (mitochondria, nuclei)",
    ),
)

REGISTRY: dict[str, ModelEntry] = {entry.name: entry for entry in _ENTRIES}
"""Every downloadable checkpoint by name, in the order menus show them."""


def list_models() -> list[ModelEntry]:
    """All registry entries, in registry order.

    Returns
    -------
    list of ModelEntry
    """
    return list(REGISTRY.values())


def get_entry(name: str) -> ModelEntry:
    """The registry entry called ``name``.

    Raises
    ------
    UnknownModelError
        For a name that is not in the registry; the message lists the known names.
    """
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownModelError(
            f"unknown model {name!r}; available models: {', '.join(REGISTRY)}, and 'default' (shipped with "
            f"the package, never downloaded)"
        ) from None


def cache_dir() -> Path:
    """The folder checkpoints are downloaded into.

    ``$NAPARI_SAM_CACHE_DIR`` when set (``~`` is expanded), else the operating system's
    user cache folder for ``napari-sam`` (for example ``~/.cache/napari-sam`` on Linux).
    Read on every call, so changing the variable takes effect at once. The folder is not
    created here.

    Returns
    -------
    pathlib.Path
    """
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    import pooch

    return Path(pooch.os_cache("napari-sam"))


def checkpoint_path(name: str) -> Path:
    """Where the checkpoint ``name`` is (or will be) stored in the cache.

    A file placed there by hand is used by :func:`fetch_checkpoint` once its checksum
    matches. Nothing is checked or downloaded here.

    Raises
    ------
    UnknownModelError
        For a name that is not in the registry.
    """
    return cache_dir() / get_entry(name).filename


def _downloader(progress: bool):
    """The pooch downloader for HTTPS; a progress bar only where tqdm is installed."""
    import pooch

    if progress:
        try:
            import tqdm  # noqa: F401
        except ImportError:
            progress = False
    return pooch.HTTPDownloader(progressbar=progress)


def _by_hand(entry: ModelEntry, path: Path) -> str:
    return (
        f"To install it by hand, download {entry.url} on a machine with internet access and "
        f"save it as {path} (the file name must be {entry.filename!r}; its {entry.hash_algorithm} "
        f"checksum must be {entry.known_hash.partition(':')[2]}). "
        f"Set {CACHE_ENV_VAR} to use another cache folder."
    )


def _check_hash_support(entry: ModelEntry, path: Path) -> None:
    if entry.hash_algorithm.startswith("xxh"):
        try:
            import xxhash  # noqa: F401
        except ImportError:
            raise CheckpointDownloadError(
                f"the checksum of {entry.name!r} ({entry.filename}) is an {entry.hash_algorithm} hash, "
                f"which needs the 'xxhash' package: pip install xxhash. The file is, or will be, at {path}."
            ) from None


def fetch_checkpoint(name: str, progress: bool = True) -> Path:
    """Return the local path of a registry checkpoint, downloading it if needed.

    A file already in the cache with the right checksum is returned without any network
    access. Otherwise the file is downloaded from the registry's address into a temporary
    file beside its final place and moved there only once its checksum matches.

    Parameters
    ----------
    name
        A registry name; see :func:`list_models`.
    progress
        Show a download progress bar (needs ``tqdm``; silently off without it).

    Returns
    -------
    pathlib.Path
        The verified checkpoint file in :func:`cache_dir`.

    Raises
    ------
    UnknownModelError
        For a name that is not in the registry.
    ChecksumMismatchError
        When the downloaded file's checksum differs from the registry's; nothing is kept.
    CheckpointDownloadError
        When the download fails (offline, address unreachable, disk full) or the hash
        algorithm's package is missing. The message names the URL, the file name and
        the path where the file can be placed by hand.
    """
    import pooch

    entry = get_entry(name)
    folder = cache_dir()
    path = folder / entry.filename
    _check_hash_support(entry, path)
    stale = path.exists()  # present but possibly with the wrong checksum
    transfer = _downloader(progress)
    completed = []  # set once the bytes arrived, so a later failure is the checksum's

    def download(url, output_file, pooch_instance):
        transfer(url, output_file, pooch_instance)
        completed.append(url)

    try:
        fetched = pooch.retrieve(
            url=entry.url, known_hash=entry.known_hash, fname=entry.filename, path=folder, downloader=download
        )
    except Exception as err:  # requests' errors, OSError, pooch's ValueError: no verified file
        if completed and isinstance(err, ValueError):
            raise ChecksumMismatchError(
                f"the file downloaded from {entry.url} for model {entry.name!r} does not have the expected "
                f"checksum and was deleted ({err}). The address may now serve another file. "
                + _by_hand(entry, path)
            ) from err
        present = (
            f"A file is present at {path} but its checksum does not match, so it was not used. "
            if stale and path.exists()
            else ""
        )
        raise CheckpointDownloadError(
            f"could not download {entry.filename!r} for model {entry.name!r} from {entry.url}: "
            f"{type(err).__name__}: {err}. " + present + _by_hand(entry, path)
        ) from err
    return Path(fetched)
