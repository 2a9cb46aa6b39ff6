"""dsv4: DeepSeek-V4 in PyTorch (+ Triton) to train, run and study V4-architecture models.

The public names are imported on first use (PEP 562), so `import dsv4.config` or `dsv4 --help` does not pay
for torch: every `import dsv4.<anything>` runs this file first.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpoint import CheckpointError, load_model, save_model
    from .config import ConfigError, ModelConfig
    from .errors import DsV4Error
    from .cache import CacheDamaged
    from .generate import NonFiniteWarning, Tokenizer, generate, generate_stream
    from .model import Transformer

# public name -> the module that defines it
_EXPORTS = {"ModelConfig": "config", "ConfigError": "config", "DsV4Error": "errors", "Transformer": "model",
            "load_model": "checkpoint", "save_model": "checkpoint", "CheckpointError": "checkpoint",
            "generate": "generate", "generate_stream": "generate", "Tokenizer": "generate",
            "NonFiniteWarning": "generate", "CacheDamaged": "cache"}
_SUBPACKAGES = {"cache", "checkpoint", "cli", "config", "distributed", "errors", "info", "model", "ops", "quant",
                "train"}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBPACKAGES)


class _Package(types.ModuleType):
    """Keeps `dsv4.generate` the generate function: importing the `dsv4.generate` package (which any module may
    do first) sets the attribute of that name on this package to the package itself."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "generate" and isinstance(value, types.ModuleType):
            value = value.generate
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
