import pytest
import torch

from napari_sam.model import SamConfig, ViTConfig, build_sam

TINY = SamConfig(ViTConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)), name="tiny-test")


@pytest.fixture(scope="session")
def tiny_sam():
    """A SAM with a two-block ViT and random weights: the real code paths, fast."""
    torch.manual_seed(0)
    return build_sam(TINY)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_sam):
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sam.pth"
    torch.save(tiny_sam.state_dict(), path)
    return path
