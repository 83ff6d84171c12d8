"""The SAM 2.1 reference sets that the parity tests compare with (see tests/reference/sam2/README.md).

A set is a folder holding ``config.json`` (the official yaml ``model:`` node, resolved),
``weights.pth`` (``{"model": state_dict}`` as the official checkpoints store it), ``image.npz``
and, where made, ``video.npz``: inputs and outputs of the official code. The committed sets
live in ``tests/reference/sam2``; more (e.g. larger ones) can be dropped as ``sam2*`` folders
into ``$NAPARI_SAM_REFERENCE_DIR`` (default ``../shared/reference`` beside the repository, as
``tests/test_reference_parity.py`` resolves it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[3]
COMMITTED = REPO / "tests" / "reference" / "sam2"
REQUIRED = ("config.json", "weights.pth", "image.npz")


def reference_dir() -> Path:
    """The folder of extra reference sets: ``$NAPARI_SAM_REFERENCE_DIR`` or ``../shared/reference``."""
    return Path(os.environ.get("NAPARI_SAM_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


def _is_set(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in REQUIRED)


def reference_sets() -> list[Path]:
    """Every SAM 2.1 reference set: the committed ones, then ``sam2*`` sets of the reference dir.

    Returns
    -------
    list of Path
        Set folders, each sorted by name within its source; a folder is a set when it holds
        ``config.json``, ``weights.pth`` and ``image.npz``.
    """
    committed = sorted(p for p in COMMITTED.iterdir() if _is_set(p)) if COMMITTED.is_dir() else []
    extra_dir = reference_dir()
    extra = sorted(p for p in extra_dir.glob("sam2*") if _is_set(p)) if extra_dir.is_dir() else []
    seen = {p.resolve() for p in committed}
    return committed + [p for p in extra if p.resolve() not in seen]


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def load_set(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Load one reference set.

    Parameters
    ----------
    path : Path
        A set folder (see :func:`reference_sets`).

    Returns
    -------
    config : dict
        The resolved official ``model:`` node (plain JSON).
    state_dict : dict of str to Tensor
        The ``"model"`` entry of ``weights.pth``, loaded with ``weights_only=True``.
    image : dict of str to ndarray
        ``image.npz`` (keys in tests/reference/sam2/README.md).
    video : dict of str to ndarray
        ``video.npz``, or an empty dict where the set has none.

    Raises
    ------
    ValueError
        If ``path`` is not a complete set or its checkpoint lacks ``"model"``.
    """
    path = Path(path)
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        raise ValueError(f"reference set {path} lacks {', '.join(missing)}")
    config = json.loads((path / "config.json").read_text())
    checkpoint = torch.load(path / "weights.pth", map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise ValueError(f"reference set {path}: weights.pth is not {{'model': state_dict}}")
    video_path = path / "video.npz"
    video = _npz(video_path) if video_path.is_file() else {}
    return config, checkpoint["model"], _npz(path / "image.npz"), video
