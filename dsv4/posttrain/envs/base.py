"""What every environment offers the post-training loops.

A `Problem` is a prompt (OpenAI messages, possibly with `tools`) plus what only the reward may see. An
`Environment` makes fresh problems from a seed, a fixed held-out set disjoint from them, demonstrations for SFT
(the assistant turns a correct solver writes, tool calls included), tool results for multi-turn problems, and a
reward on the assistant turns a model produced. An environment whose reward is cheaper in bulk may also offer
`reward_batch(items) -> list[Reward]` over (problem, turns) pairs, deterministic per pair: rollouts then score
all its trajectories in one call.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["Problem", "Reward", "Environment", "EnvironmentWrapper"]


@dataclass(frozen=True)
class Problem:
    domain: str                      # the environment's name: "math" | "code" | "instruct" | "agent" | ...
    id: str                          # unique within the domain; held-out ids never occur among sampled ones
    messages: list[dict]             # the prompt in OpenAI format (system/user turns; `tools` on a message)
    answer: Any                      # hidden from the model: what the reward checks against
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Reward:
    score: float                     # in [0, 1]; what GRPO optimises
    correct: bool                    # the task fully solved; what accuracy counts
    info: dict = field(default_factory=dict)   # why (parse failure, tests passed, constraint violated, ...)


@runtime_checkable
class Environment(Protocol):
    name: str
    max_turns: int                   # 1 for single-turn tasks; the agent environment allows several

    def sample(self, rng: random.Random) -> Problem:
        """A fresh problem; never one of `heldout`'s."""

    def heldout(self, n: int) -> list[Problem]:
        """The first `n` problems of a fixed evaluation set (the same on every call)."""

    def demonstrate(self, problem: Problem) -> list[dict]:
        """The assistant (and tool) messages a correct solver writes: SFT targets."""

    def tool_results(self, problem: Problem, tool_calls: list[dict]) -> list[dict]:
        """The `tool` messages answering an assistant turn's calls (OpenAI shapes); [] for tool-less tasks."""

    def reward(self, problem: Problem, turns: list[dict]) -> Reward:
        """Score the model's turns (parsed assistant messages and the tool messages between them)."""


class EnvironmentWrapper:
    """Another environment with some of its methods replaced: everything a subclass does not override is `env`'s."""

    def __init__(self, env: Environment):
        self.env = env
        self.name, self.max_turns = env.name, env.max_turns

    def sample(self, rng: random.Random) -> Problem:
        return self.env.sample(rng)

    def heldout(self, n: int) -> list[Problem]:
        return self.env.heldout(n)

    def demonstrate(self, problem: Problem) -> list[dict]:
        return self.env.demonstrate(problem)

    def tool_results(self, problem: Problem, tool_calls: list[dict]) -> list[dict]:
        return self.env.tool_results(problem, tool_calls)

    def reward(self, problem: Problem, turns: list[dict]) -> Reward:
        return self.env.reward(problem, turns)

    def __getattr__(self, name: str):
        """`reward_batch` (rollout.py scores with it where an environment has one) is `env`'s when `env` has it
        and this wrapper scores as `env` does (a subclass that replaces `reward` scores one by one)."""
        if name == "reward_batch" and type(self).reward is EnvironmentWrapper.reward:
            batch = getattr(self.__dict__.get("env"), "reward_batch", None)
            if batch is not None:
                return batch
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
