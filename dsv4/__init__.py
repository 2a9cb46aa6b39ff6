"""dsv4: DeepSeek-V4 in PyTorch (+ Triton) to train, run and study V4-architecture models."""
from .config import ConfigError, ModelConfig
from .cache import CacheDamaged
from .model import Transformer
from .checkpoint import CheckpointError, load_model, save_model
from .generate import NonFiniteWarning, Tokenizer, generate, generate_stream

__all__ = ["ModelConfig", "ConfigError", "Transformer", "load_model", "save_model", "CheckpointError",
           "generate", "generate_stream", "Tokenizer", "CacheDamaged",
           "NonFiniteWarning"]
__version__ = "0.1.0"
