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


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny SAM loaded from its file, as users load models (it knows its checkpoint)."""
    from napari_sam.core.models import load_model

    return load_model(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """A two-block SAM with a 256-pixel input (written with its configuration), so that
    an instance decoder trains in seconds."""
    from napari_sam.model.checkpoint import write_checkpoint
    from napari_sam.model.config import config_to_dict

    torch.manual_seed(0)
    config = SamConfig(ViTConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), img_size=256),
                       name="small-256", image_size=256)
    path = tmp_path_factory.mktemp("small") / "small.pth"
    write_checkpoint(path, build_sam(config).state_dict(), {"config": config_to_dict(config)})
    return path


@pytest.fixture(scope="session")
def nuclei_3d(shared_dir):
    """Real 3D nuclei (GoNuclear crop, 100^3 uint8) and their instance labels."""
    import tifffile

    folder = shared_dir / "data" / "gonuclear_3d"
    image = tifffile.imread(next((folder / "images").glob("*.tif")))
    labels = tifffile.imread(next((folder / "labels").glob("*.tif")))
    return image, labels


@pytest.fixture(scope="session")
def nuclei_2d(shared_dir):
    """A real 2D fluorescence image (DSB 2018, 512x512 uint16, 125 nuclei) and its labels."""
    import tifffile

    folder = shared_dir / "data" / "stardist_bundled"
    return tifffile.imread(folder / "img2d.tif"), tifffile.imread(folder / "mask2d.tif")


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch):
    """Every test gets its own cache folder: nothing lands in the user's cache."""
    monkeypatch.setenv("NAPARI_SAM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def drain(gen):
    """Run a progress generator to its end: (the reports it yielded, the value it returned)."""
    reports = []
    while True:
        try:
            reports.append(next(gen))
        except StopIteration as stop:
            return reports, stop.value
