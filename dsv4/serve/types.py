"""The values the serving engine and its front ends share: a request's sampling parameters, the events its
stream yields, and the error a full queue raises. Checked where they are built, so a bad value is refused
with a message naming the parameter before it reaches the engine."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import DsV4Error, InvalidArgument

__all__ = ["SamplingParams", "TokenEvent", "QueueFull"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0 = off
    seed: int | None = None         # None: engine picks; same seed + same prompt => same output
    stop_token_ids: tuple[int, ...] = ()   # generation stops after emitting one (it is included in the events)
    logprobs: int | None = None     # None: none; k >= 0: the chosen token's logprob plus the top-k
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        from ..generate.sampling import SamplingConfig, as_integer, check_generation_args  # torch when used
        cfg = SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        max_tokens, _ = check_generation_args(self.max_tokens, 0 if self.seed is None else self.seed)
        if max_tokens < 1:
            raise InvalidArgument(f"max_tokens={max_tokens}: must be >= 1")
        if self.seed is not None:
            check_generation_args(0, self.seed)
        stops = self.stop_token_ids
        if isinstance(stops, (str, bytes)) or not hasattr(stops, "__iter__"):
            raise InvalidArgument(f"stop_token_ids={stops!r}: must be a sequence of token ids")
        stops = tuple(as_integer("stop_token_ids", t) for t in stops)
        if any(t < 0 for t in stops):
            raise InvalidArgument(f"stop_token_ids={stops!r}: token ids must be >= 0")
        logprobs = self.logprobs
        if logprobs is not None:
            logprobs = as_integer("logprobs", logprobs)
            if logprobs < 0:
                raise InvalidArgument(f"logprobs={logprobs}: must be >= 0 (or None for no logprobs)")
        object.__setattr__(self, "max_tokens", max_tokens)
        object.__setattr__(self, "temperature", cfg.temperature)
        object.__setattr__(self, "top_p", cfg.top_p)
        object.__setattr__(self, "top_k", cfg.top_k)
        object.__setattr__(self, "stop_token_ids", stops)
        object.__setattr__(self, "logprobs", logprobs)


@dataclass
class TokenEvent:
    token: int | None                       # None only in a final event that carries no token
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None        # None while running; "stop" | "length" | "abort" | "error"
    error: str | None = None


class QueueFull(DsV4Error):
    """The engine's request queue is at its bound; the caller should retry later (HTTP 429)."""

