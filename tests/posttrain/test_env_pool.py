"""The RL training pool: `size` distinct training problems of the wrapped environment, fixed by the seed, with
its held-out set and reward unchanged."""
import random

import pytest

from dsv4.errors import InvalidArgument
from dsv4.posttrain.envs.math import MathEnv
from dsv4.posttrain.envs.pool import ProblemPool


def test_pool_samples_only_its_distinct_training_problems():
    env = MathEnv("easy")
    pool = ProblemPool(env, 12, seed=3)
    ids = [p.id for p in pool.problems]
    assert len(set(ids)) == 12 and ids == [p.id for p in ProblemPool(env, 12, seed=3).problems]
    assert ids != [p.id for p in ProblemPool(env, 12, seed=4).problems]
    heldout = {p.id for p in env.heldout(64)}
    rng = random.Random(0)
    drawn = [pool.sample(rng) for _ in range(200)]
    assert {p.id for p in drawn} == set(ids) and not heldout & set(ids)
    assert [p.id for p in pool.heldout(64)] == [p.id for p in env.heldout(64)]
    p = drawn[0]
    assert pool.reward(p, env.demonstrate(p)).correct and pool.name == "math" and pool.max_turns == 1


def test_pool_larger_than_the_problem_space_is_refused():
    with pytest.raises(InvalidArgument, match="distinct training problems"):
        ProblemPool(MathEnv("easy"), 5000, attempts_per_problem=1)   # easy has ~3800
    with pytest.raises(InvalidArgument, match="positive integer"):
        ProblemPool(MathEnv("easy"), 0)
