"""One sampled answer to one problem, as the training losses read it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .envs.base import Problem, Reward

__all__ = ["Trajectory"]


@dataclass
class Trajectory:
    problem: Problem
    tokens: list[int]                # the whole sequence: prompt, sampled tokens, tool results between turns
    prompt_len: int                  # tokens[:prompt_len] is the first prompt
    policy_mask: list[int]           # 1 where the token was sampled by the policy (the loss reads only these)
    logprobs: list[float]            # the sampler's log-probability of tokens[i] where policy_mask[i], else 0.0
    turns: list[dict] = field(default_factory=list)   # parsed assistant messages and tool messages
    reward: Reward | None = None
    routing: Any = None              # what routing replay recorded at rollout time (None when off)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if len(self.policy_mask) != n or len(self.logprobs) != n:
            raise ValueError(f"trajectory of {n} tokens has {len(self.policy_mask)} mask entries and "
                             f"{len(self.logprobs)} logprobs; each must have one per token")
        if not 0 < self.prompt_len <= n or any(self.policy_mask[:self.prompt_len]):
            raise ValueError(f"prompt_len={self.prompt_len}: must be in (0, {n}] with no policy tokens before it")
