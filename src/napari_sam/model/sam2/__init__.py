"""SAM 2.1 in PyTorch under the official parameter names: the Hiera image encoder, the
prompt encoder and mask decoder, the memory attention and memory encoder, image
prediction and video tracking. Imports only torch."""

from .config import CONFIGS, Sam2Config, config_from_dict, config_from_official, config_to_dict
from .image_predictor import Sam2ImagePredictor
from .sam2 import NO_OBJ_SCORE, Sam2, build_sam2, infer_sam2_config, sam2_from_state_dict
from .video import Sam2Video

__all__ = [
    "CONFIGS",
    "NO_OBJ_SCORE",
    "Sam2",
    "Sam2Config",
    "Sam2ImagePredictor",
    "Sam2Video",
    "build_sam2",
    "config_from_dict",
    "config_from_official",
    "config_to_dict",
    "infer_sam2_config",
    "sam2_from_state_dict",
]
