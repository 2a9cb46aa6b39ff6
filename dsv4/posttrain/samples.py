"""What a sampler returns for one context: the rollout's unit, shared by the engine path and the recording
sampler of routing replay."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Sampled"]


@dataclass
class Sampled:
    """One completion of one context: the new tokens, the log-probability of each under the distribution it was
    drawn from, why it stopped ("stop" | "length"), and (when recorded) the routing of every fed position."""
    tokens: list[int]
    logprobs: list[float]
    finish: str
    routing: Any = None
    request: str | None = None       # the engine's request id
