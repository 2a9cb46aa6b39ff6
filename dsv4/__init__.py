"""dsv4: DeepSeek-V4 in PyTorch (+ Triton) to train, run and study V4-architecture models."""
from .config import ConfigError, ModelConfig
from .model import Transformer
from .checkpoint import CheckpointError, load_model, save_model

__all__ = ["ModelConfig", "ConfigError", "Transformer", "load_model", "save_model", "CheckpointError"]
__version__ = "0.1.0"
