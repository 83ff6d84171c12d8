"""Fixtures of the training tests: one torch thread, and the "mini" SAM most of them train.

The mini SAM's input is 256 pixels (16x16 embedding, 64x64 low-res masks): every code
path of the real one at a sixteenth of the cost.
"""

import pytest
import torch

from napari_sam.model import SamConfig, ViTConfig, build_sam

MINI = SamConfig(
    ViTConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), img_size=256), name="mini", image_size=256
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: with two threads on a shared 2-core machine, OpenMP waits
    on the busy core far longer than the work takes (runs became ten times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mini_config():
    """The mini SAM's configuration."""
    return MINI


@pytest.fixture
def mini_sam():
    """A freshly initialised mini SAM (seed 0)."""
    torch.manual_seed(0)
    return build_sam(MINI)
