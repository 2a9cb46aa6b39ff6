"""Generation: sampling, the cached decode loop, the tokenizer and the V4 chat format."""
from .engine import generate, generate_stream
from .nonfinite import NonFiniteWarning, find_nonfinite
from .prefix_store import PrefixStore
from .sampling import SamplingConfig, sample
from .tokenizer import Tokenizer

__all__ = ["generate", "generate_stream", "SamplingConfig", "sample", "Tokenizer", "PrefixStore",
           "NonFiniteWarning", "find_nonfinite"]
