"""Registry of public SAM checkpoints, the cache they live in, and their download.

Nothing here touches the network until :func:`fetch_checkpoint` or :func:`fetch_decoder`
is called. Every file is pinned to a checksum; a file whose checksum does not match is
never handed out. Where the machine is offline, the error says which file to fetch by
hand and where to put it.
micro-sam's light-microscopy and EM models keep their instance decoder in a file of its
own (:attr:`ModelEntry.decoder`), fetched only by :func:`fetch_decoder`.
Meta's SAM 2.1 checkpoints are entries of the family ``"sam2"`` (:attr:`ModelEntry.family`):
fetched the same way, loaded by ``napari_sam.core.sam2_models.load_sam2_model``.

The cache folder is ``$NAPARI_SAM_CACHE_DIR`` when that variable is set, otherwise the
operating system's user cache folder for ``napari-sam`` (see :func:`cache_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ._registry_entry import ENCODERS, FAMILIES, DecoderFile, ModelEntry, family_of

__all__ = [
    "CACHE_ENV_VAR",
    "ENCODERS",
    "FAMILIES",
    "REGISTRY",
    "CheckpointDownloadError",
    "ChecksumMismatchError",
    "DecoderFile",
    "ModelEntry",
    "UnknownModelError",
    "cache_dir",
    "checkpoint_path",
    "family_of",
    "fetch_checkpoint",
    "fetch_decoder",
    "get_entry",
    "list_models",
]

CACHE_ENV_VAR = "NAPARI_SAM_CACHE_DIR"
"""Environment variable that, when set, names the folder checkpoints are cached in."""


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


_SAM_HOME = "https://github.com/facebookresearch/segment-anything"
_SAM2_HOME = "https://github.com/facebookresearch/sam2"
_MOBILE_SAM_HOME = "https://github.com/ChaoningZhang/MobileSAM"
_MICRO_SAM_HOME = "https://github.com/computational-cell-analytics/micro-sam"
_BIOIMAGE_IO = "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io"


def _micro_sam(name: str, config: str, model_id: str, version: str, xxh128: str, decoder_xxh128: str,
              what: str) -> ModelEntry:
    files = f"{_BIOIMAGE_IO}/{model_id}/{version}/files"
    stem = f"micro_sam_{name}_{model_id}_{version}"
    return ModelEntry(
        name=name,
        config=config,
        url=f"{files}/{config}.pt",
        known_hash=f"xxh128:{xxh128}",
        filename=f"{stem}.pt",
        description=f"micro-sam {config}, fine-tuned for {what} (BioImage.IO {model_id} {version})",
        licence="CC-BY-4.0",
        homepage=_MICRO_SAM_HOME,
        decoder=DecoderFile(f"{files}/{config}_decoder.pt", f"xxh128:{decoder_xxh128}", f"{stem}_decoder.pt"),
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


def _meta_sam2(size: str, sha256: str, size_bytes: int, what: str) -> ModelEntry:
    stem = f"sam2.1_hiera_{size}"
    return ModelEntry(
        name=stem,
        config=stem,
        url=f"https://dl.fbaipublicfiles.com/segment_anything_2/092824/{stem}.pt",
        known_hash=f"sha256:{sha256}",
        filename=f"{stem}.pt",
        description=f"SAM 2.1 {what}: propagation through Z and T with memory",
        licence="Apache-2.0",
        homepage=_SAM2_HOME,
        size_bytes=size_bytes,
    )


_LM, _EM = "light microscopy", "electron microscopy organelles (mitochondria, nuclei)"
# micro-sam's registry (micro_sam/util.py, models()): name, encoder, BioImage.IO id and
# version, xxh128 of the SAM weights, xxh128 of the decoder ("<name>_decoder"), what for.
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
    *(_micro_sam(*row) for row in (
        ("vit_b_lm", "vit_b", "diplomatic-bug", "1.2", "fe9252a29f3f4ea53c15a06de471e186",
         "708b15ac620e235f90bb38612c4929ba", _LM),
        ("vit_l_lm", "vit_l", "idealistic-rat", "1.2", "017f20677997d628426dec80a8018f9d",
         "2faeafa03819dfe03e7c46a44aaac64a", _LM),
        ("vit_t_lm", "vit_t", "faithful-chicken", "1.1", "72ec5074774761a6e5c05a08942f981e",
         "3e914a5f397b0312cdd36813031f8823", _LM),
        ("vit_b_em_organelles", "vit_b", "noisy-ox", "1.2", "f3bf2ed83d691456bae2c3f9a05fb438",
         "bb6398956a6b0132c26b631c14f95ce2", _EM),
        ("vit_l_em_organelles", "vit_l", "humorous-crab", "1.2", "810b084b6e51acdbf760a993d8619f2d",
         "334877640bfdaaabce533e3252a17294", _EM),
        ("vit_t_em_organelles", "vit_t", "greedy-whale", "1", "253474720c497cce605e57c9b1d18fd9",
         "8f897c7bb93174a4d1638827c4dd6f44", _EM),
    )),
    # Meta publishes no checksums for SAM 2.1: these sha256 digests and sizes are the ones micro-sam
    # pins for the same addresses (micro_sam/v2/util.py, HASHES, at commit 05c57cce), which other
    # projects' records of these files and Hugging Face's LFS pointers (facebook/sam2.1-hiera-*) match.
    # Parameters: the official configurations (configs/sam2.1/*.yaml) built and counted.
    *(_meta_sam2(*row) for row in (
        ("tiny", "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69", 156_008_466,
         "Hiera-T (Meta, 39M parameters, the fastest)"),
        ("small", "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38", 184_416_285,
         "Hiera-S (Meta, 46M parameters)"),
        ("base_plus", "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5", 323_606_802,
         "Hiera-B+ (Meta, 81M parameters)"),
        ("large", "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318", 898_083_611,
         "Hiera-L (Meta, 224M parameters, the most accurate)"),
    )),
)

REGISTRY: dict[str, ModelEntry] = {entry.name: entry for entry in _ENTRIES}
"""Every downloadable checkpoint by name, in the order menus show them."""


def list_models(family: Optional[str] = None) -> list[ModelEntry]:
    """Registry entries, in registry order.

    Parameters
    ----------
    family
        Only the entries of this family (a key of :data:`FAMILIES`: ``"sam"`` or
        ``"sam2"``); None for all.

    Returns
    -------
    list of ModelEntry

    Raises
    ------
    ValueError
        For a family that does not exist.
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; families: {', '.join(FAMILIES)}")
    return [e for e in REGISTRY.values() if family is None or e.family == family]


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


def _by_hand(file: ModelEntry | DecoderFile, path: Path) -> str:
    algorithm, _, digest = file.known_hash.partition(":")
    return (
        f"To install it by hand, download {file.url} on a machine with internet access and "
        f"save it as {path} (the file name must be {file.filename!r}; its {algorithm} "
        f"checksum must be {digest}). "
        f"Set {CACHE_ENV_VAR} to use another cache folder."
    )


def _check_hash_support(file: ModelEntry | DecoderFile, what: str, path: Path) -> None:
    algorithm = file.known_hash.partition(":")[0]
    if algorithm.startswith("xxh"):
        try:
            import xxhash  # noqa: F401
        except ImportError:
            raise CheckpointDownloadError(
                f"the checksum of {what} ({file.filename}) is an {algorithm} hash, "
                f"which needs the 'xxhash' package: pip install xxhash. The file is, or will be, at {path}."
            ) from None


def _fetch(file: ModelEntry | DecoderFile, what: str, progress: bool) -> Path:
    """The verified cached copy of a registry file; ``what`` names it in errors."""
    import pooch

    folder = cache_dir()
    path = folder / file.filename
    _check_hash_support(file, what, path)
    stale = path.exists()  # present but possibly with the wrong checksum
    transfer = _downloader(progress)
    completed = []  # set once the bytes arrived, so a later failure is the checksum's

    def download(url, output_file, pooch_instance):
        transfer(url, output_file, pooch_instance)
        completed.append(url)

    try:
        fetched = pooch.retrieve(
            url=file.url, known_hash=file.known_hash, fname=file.filename, path=folder, downloader=download
        )
    except Exception as err:  # requests' errors, OSError, pooch's ValueError: no verified file
        if completed and isinstance(err, ValueError):
            raise ChecksumMismatchError(
                f"the file downloaded from {file.url} for {what} does not have the expected "
                f"checksum and was deleted ({err}). The address may now serve another file. "
                + _by_hand(file, path)
            ) from err
        present = (
            f"A file is present at {path} but its checksum does not match, so it was not used. "
            if stale and path.exists()
            else ""
        )
        raise CheckpointDownloadError(
            f"could not download {file.filename!r} for {what} from {file.url}: "
            f"{type(err).__name__}: {err}. " + present + _by_hand(file, path)
        ) from err
    return Path(fetched)


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
    entry = get_entry(name)
    return _fetch(entry, f"model {entry.name!r}", progress)


def fetch_decoder(name: str, progress: bool = True) -> Optional[Path]:
    """The verified local path of a registry model's instance decoder file
    (:attr:`ModelEntry.decoder`), cached and downloaded as :func:`fetch_checkpoint` does.

    Returns
    -------
    pathlib.Path or None
        The decoder's state dict alone, in :func:`cache_dir`; None, without any network
        access, for a model whose decoder is not a file of its own.

    Raises
    ------
    UnknownModelError, ChecksumMismatchError, CheckpointDownloadError
        As :func:`fetch_checkpoint`.
    """
    entry = get_entry(name)
    if entry.decoder is None:
        return None
    return _fetch(entry.decoder, f"the instance decoder of model {entry.name!r}", progress)
