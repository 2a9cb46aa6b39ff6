"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling with a seeded generator.

The parameters are checked where they enter (`SamplingConfig`, `check_generation_args`): a NaN temperature or
a float token count would otherwise fail deep inside torch, or be truncated silently.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidArgument

__all__ = ["SamplingConfig", "sample", "probabilities", "check_generation_args", "as_integer"]


@dataclass(kw_only=True)
class SamplingConfig:
    temperature: float = 0.0   # 0 = greedy (argmax)
    top_p: float = 1.0
    top_k: int = 0             # 0 = no top-k cut

    def __post_init__(self) -> None:
        self.temperature = _number("temperature", self.temperature)
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature={self.temperature!r}: must be a finite number >= 0 (0 = greedy)")
        self.top_p = _number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:   # False for NaN too
            raise InvalidArgument(f"top_p={self.top_p!r}: must be in (0, 1]")
        self.top_k = as_integer("top_k", self.top_k)
        if self.top_k < 0:
            raise InvalidArgument(f"top_k={self.top_k!r}: must be >= 0 (0 = no top-k cut)")


def check_generation_args(max_new_tokens: Any, seed: Any = 0) -> tuple[int, int]:
    """(max_new_tokens, seed) as ints, refusing floats, bools, negative counts and seeds outside 64 bits."""
    max_new_tokens = as_integer("max_new_tokens", max_new_tokens)
    if max_new_tokens < 0:
        raise InvalidArgument(f"max_new_tokens={max_new_tokens}: must be >= 0")
    seed = as_integer("seed", seed)
    if not -(1 << 63) <= seed < (1 << 64):
        raise InvalidArgument(f"seed={seed}: must fit in 64 bits")
    return max_new_tokens, seed


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{name}={value!r}: must be a number, got {type(value).__name__}")
    return float(value)


def as_integer(name: str, value: Any) -> int:
    """An int (or anything with `__index__`, as numpy integers have); never a bool or a float (5.0 included:
    a count given as a float is more likely a mistake than a choice)."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{name}={value!r}: must be an integer, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidArgument(f"{name}={value!r}: must be an integer, got {type(value).__name__}") from None


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(probabilities(logits, cfg), 1, generator=generator).squeeze(-1)


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits [..., V] -> the distribution `sample` draws from at temperature > 0 (after top-k and top-p): fp32
    [..., V]. Speculative decoding compares the target's and the draft's under the same settings."""
    logits = logits.float()
    # shifted so the largest is 0 before scaling: a tiny temperature then gives -inf, never inf - inf = NaN
    logits = (logits - logits.amax(-1, keepdim=True)) / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        drop = sorted_p.cumsum(-1) - sorted_p >= cfg.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return probs
