"""Fixtures shared by the whole suite: where the shared data lives, and a tiny SAM."""

import os
from pathlib import Path

import pytest
import torch

from napari_sam.model import SamConfig, ViTConfig, build_sam

REPO = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("NAPARI_SAM_SHARED_DIR", REPO.parent / "shared"))
REFERENCE_DIR = Path(os.environ.get("NAPARI_SAM_REFERENCE_DIR", SHARED_DIR / "reference"))

TINY = SamConfig(ViTConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)), name="tiny-test")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    assert SHARED_DIR.is_dir(), f"shared data not found at {SHARED_DIR} (set NAPARI_SAM_SHARED_DIR)"
    return SHARED_DIR


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    assert REFERENCE_DIR.is_dir(), f"reference data not found at {REFERENCE_DIR} (set NAPARI_SAM_REFERENCE_DIR)"
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def tiny_sam():
    """A SAM with a two-block ViT and random weights: every real code path, fast."""
    torch.manual_seed(0)
    return build_sam(TINY)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_sam):
    """The tiny SAM saved as an official-format state dict."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sam.pth"
    torch.save(tiny_sam.state_dict(), path)
    return path
