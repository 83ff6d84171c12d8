"""Segment Anything in PyTorch: image encoders (ViT, TinyViT), prompt encoder and mask
decoder, with parameter names of the official checkpoints. Imports only torch."""

from .config import CONFIGS, SamConfig, TinyViTConfig, ViTConfig, infer_config
from .sam import Sam, StateDictMismatch, build_sam, check_state_dict, sam_from_state_dict

__all__ = [
    "CONFIGS",
    "Sam",
    "SamConfig",
    "StateDictMismatch",
    "TinyViTConfig",
    "ViTConfig",
    "build_sam",
    "check_state_dict",
    "infer_config",
    "sam_from_state_dict",
]
