"""The environment registry: names, levels, errors; only this branch's environments are built here."""
import random

import pytest

from dsv4.errors import InvalidArgument
from dsv4.posttrain.envs import Environment
from dsv4.posttrain.envs.registry import ENV_NAMES, make_env

MINE = ("instruct", "agent", "rubric")


def test_names():
    assert set(ENV_NAMES) == {"math", "code", "instruct", "agent", "rubric"}


@pytest.mark.parametrize("name", MINE)
@pytest.mark.parametrize("level", ["easy", "hard"])
def test_make_env_builds_a_working_environment(name, level):
    env = make_env(name, level=level)
    assert isinstance(env, Environment) and env.name == name and env.level == level
    p = env.sample(random.Random(0))
    assert p.domain == name and env.reward(p, env.demonstrate(p)).correct


def test_bad_name_and_level_are_named():
    with pytest.raises(InvalidArgument, match="unknown environment 'chess'.*math, code, instruct"):
        make_env("chess")
    with pytest.raises(InvalidArgument, match="agent environment: level='extreme'"):
        make_env("agent", level="extreme")
    with pytest.raises(TypeError):
        make_env("instruct", colour="red")


def test_a_missing_module_or_class_is_named(monkeypatch):
    from dsv4.posttrain.envs import registry
    monkeypatch.setitem(registry._CLASSES, "ghost", ("ghost", "GhostEnv"))
    with pytest.raises(InvalidArgument, match="'ghost' is not available.*dsv4.posttrain.envs.ghost"):
        make_env("ghost")
    monkeypatch.setitem(registry._CLASSES, "ghost", ("split", "GhostEnv"))
    with pytest.raises(InvalidArgument, match="defines no GhostEnv"):
        make_env("ghost")


@pytest.mark.parametrize("name", MINE)
def test_problems_survive_a_json_round_trip(name):
    """Problems go to .jsonl files and back: the rebuilt problem demonstrates and scores the same."""
    import dataclasses
    import json

    from dsv4.posttrain.envs.base import Problem
    env = make_env(name, level="medium")
    for p in [env.sample(random.Random(s)) for s in range(10)] + env.heldout(5):
        back = Problem(**json.loads(json.dumps(dataclasses.asdict(p))))
        assert back == p and env.demonstrate(back) == env.demonstrate(p)
        assert env.reward(back, env.demonstrate(p)).correct


def test_split_rejects_held_out_prompts_for_any_seed():
    from dsv4.posttrain.envs.split import draw_heldout, draw_sampled, is_heldout
    keys = [f"prompt {i}" for i in range(64)]
    held_keys = {k for k in keys if is_heldout("toy", k)}
    assert 0 < len(held_keys) < 20

    def make(rng):
        key = rng.choice(keys)
        return key, key
    assert not any(draw_sampled("toy", make, random.Random(s)) in held_keys for s in range(300))
    held = draw_heldout("toy", "easy", make, len(held_keys))
    assert set(held) == held_keys and held == draw_heldout("toy", "easy", make, len(held_keys))
    with pytest.raises(InvalidArgument, match=f"has only {len(held_keys)} held-out"):
        draw_heldout("toy", "easy", make, len(held_keys) + 1)
