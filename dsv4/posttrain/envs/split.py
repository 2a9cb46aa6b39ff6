"""What the environments share: difficulty levels, the held-out split, and reading the model's final reply.

The held-out set is carved out of the problem space by a stable hash of the prompt text: a prompt is held out
when its hash lands in one bucket of `HELDOUT_BUCKETS`. `sample` rejects those prompts, so no sampled problem
can ever equal a held-out one, whatever the seed; the split needs no stored list and survives restarts.
"""
from __future__ import annotations

import hashlib
import random
from typing import Callable

from ...errors import InvalidArgument
from .base import Problem

__all__ = ["LEVELS", "HELDOUT_BUCKETS", "check_level", "is_heldout", "problem_id", "draw_sampled",
           "draw_heldout", "HashSplit", "final_assistant"]

LEVELS = ("easy", "medium", "hard")
HELDOUT_BUCKETS = 8          # one prompt in 8 belongs to the held-out set


def check_level(domain: str, level: str) -> str:
    if level not in LEVELS:
        raise InvalidArgument(f"{domain} environment: level={level!r} is not one of {LEVELS}")
    return level


def _digest(domain: str, key: str) -> str:
    return hashlib.sha256(f"{domain}\0{key}".encode()).hexdigest()


def is_heldout(domain: str, key: str) -> bool:
    """Whether the prompt `key` of `domain` belongs to the held-out set."""
    return int(_digest(domain, key)[:16], 16) % HELDOUT_BUCKETS == 0


def problem_id(domain: str, level: str, key: str) -> str:
    """An id fixed by the prompt, so equal prompts get equal ids and held-out ids never occur among sampled."""
    return f"{domain}-{level}-{_digest(domain, key)[:12]}"


def draw_sampled(domain: str, make: Callable[[random.Random], tuple[str, Problem]], rng: random.Random,
                 attempts: int = 1000) -> Problem:
    """The first problem `make(rng)` draws whose prompt key is not held out."""
    for _ in range(attempts):
        key, problem = make(rng)
        if not is_heldout(domain, key):
            return problem
    raise RuntimeError(f"{domain}: {attempts} draws in a row were held out; the problem space is too small")


def draw_heldout(domain: str, level: str, make: Callable[[random.Random], tuple[str, Problem]], n: int,
                 patience: int = 4000) -> list[Problem]:
    """The first `n` distinct held-out problems drawn from a fixed seed (so every call agrees on a prefix).
    Raises InvalidArgument when `patience` draws in a row find nothing new: the level has fewer than `n`."""
    if n < 0:
        raise InvalidArgument(f"{domain} heldout(n={n}): n must be >= 0")
    rng = random.Random(f"{domain}-heldout-{level}")
    seen: set[str] = set()
    out: list[Problem] = []
    misses = 0
    while len(out) < n:
        key, problem = make(rng)
        if key in seen or not is_heldout(domain, key):
            misses += 1
            if misses > patience:
                raise InvalidArgument(f"{domain} heldout(n={n}): level {level!r} has only {len(out)} held-out "
                                      f"problems; ask for fewer or use a harder level")
            continue
        seen.add(key)
        out.append(problem)
        misses = 0
    return out


class HashSplit:
    """`sample` and `heldout` for an environment with `name`, `level` and `_make(rng) -> (prompt key, Problem)`:
    the split above, the held-out problems drawn once and kept (a longer request extends them)."""
    name: str
    level: str
    _heldout: list[Problem] = []   # reassigned per instance, never changed in place

    def sample(self, rng: random.Random) -> Problem:
        return draw_sampled(self.name, self._make, rng)

    def heldout(self, n: int) -> list[Problem]:
        if n > len(self._heldout):
            self._heldout = draw_heldout(self.name, self.level, self._make, n)
        return self._heldout[:n]


def final_assistant(turns: list[dict]) -> dict | None:
    """The last message of a rollout when it is an assistant reply without tool calls (the final answer)."""
    if not turns or not isinstance(turns[-1], dict) or turns[-1].get("role") != "assistant":
        return None
    return None if turns[-1].get("tool_calls") else turns[-1]
