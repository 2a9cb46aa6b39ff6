"""Official V4 checkpoints in and out (names, safetensors I/O, exact FP8/FP4 dequantisation)."""
from .device import resolve_device
from .load import load_model
from .safetensors_io import CheckpointError
from .save import save_model

__all__ = ["load_model", "save_model", "CheckpointError", "resolve_device"]
