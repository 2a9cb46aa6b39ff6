"""Serving: an engine that batches many requests' decoding continuously over a fixed pool of cache rows, the
cross-request prefix cache in front of it, and the OpenAI-compatible HTTP API (`dsv4 serve`).

The names are imported on first use, so the torch-free parts (request types, text streaming) stay light."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Engine": "engine", "RequestHandle": "handle", "PrefixCache": "prefix_cache",
            "SamplingParams": "types", "TokenEvent": "types", "QueueFull": "types", "build_app": "api"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
