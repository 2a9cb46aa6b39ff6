"""A fixed training set for RL: an environment whose `sample` draws from `size` problems of another, chosen once.

Why: a policy-gradient step raises the probability of what earned reward on the prompts it saw. With fresh
problems every step a tiny model sees each of them about once, and what it learns there has to carry to problems
it never saw; on a fixed set each problem comes back every few steps (an RL epoch), so the rollout reward on the
set shows what the updates learned, and the held-out set (unchanged, disjoint) shows what of it carries over.
"""
from __future__ import annotations

import random

from ...errors import InvalidArgument
from .base import Environment, EnvironmentWrapper, Problem

__all__ = ["ProblemPool"]


class ProblemPool(EnvironmentWrapper):
    """`env` with `sample` restricted to its first `size` distinct problems drawn from `seed`; everything else
    (held-out set, demonstrations, tools, reward) is `env`'s."""

    def __init__(self, env: Environment, size: int, seed: int = 0, attempts_per_problem: int = 50):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidArgument(f"problem pool size={size!r}: must be a positive integer")
        rng = random.Random(seed)
        found: dict[str, Problem] = {}
        for _ in range(size * attempts_per_problem):
            p = env.sample(rng)
            found.setdefault(p.id, p)
            if len(found) == size:
                break
        if len(found) < size:
            raise InvalidArgument(f"{env.name}: found only {len(found)} distinct training problems for a pool of "
                                  f"{size}; ask for fewer")
        super().__init__(env)
        self.problems = list(found.values())

    def sample(self, rng: random.Random) -> Problem:
        return self.problems[rng.randrange(len(self.problems))]
