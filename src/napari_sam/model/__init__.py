"""Segment Anything in PyTorch: image encoders (ViT, TinyViT), prompt encoder and mask
decoder, with parameter names of the official checkpoints. Imports only torch."""

from .checkpoint import Checkpoint, CheckpointError, ModelSource, check_state_dict, read_checkpoint
from .config import CONFIGS, SamConfig, TinyViTConfig, ViTConfig, config_from_dict, config_to_dict, infer_config
from .sam import Sam, build_sam, sam_from_state_dict

__all__ = [
    "config_from_dict",
    "config_to_dict",
    "CONFIGS",
    "Sam",
    "SamConfig",
    "Checkpoint",
    "CheckpointError",
    "ModelSource",
    "TinyViTConfig",
    "ViTConfig",
    "build_sam",
    "check_state_dict",
    "infer_config",
    "read_checkpoint",
    "sam_from_state_dict",
]
