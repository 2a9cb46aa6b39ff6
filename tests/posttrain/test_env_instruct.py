"""Instruction following: protocol, held-out split, demonstrations that pass, violations that name the constraint."""
import json
import random

import pytest

from dsv4.errors import InvalidArgument
from dsv4.posttrain.envs import Environment
from dsv4.posttrain.envs.instruct import KINDS, Constraint, InstructEnv
from dsv4.posttrain.envs.split import is_heldout

LEVELS = ("easy", "medium", "hard")


def reply(text):
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize("level", LEVELS)
def test_protocol_demonstrations_and_split(level):
    env = InstructEnv(level)
    assert isinstance(env, Environment) and env.name == "instruct" and env.max_turns == 1
    held = env.heldout(40)
    assert env.heldout(40) == held and env.heldout(10) == held[:10]   # fixed, prefix-stable
    assert len({p.id for p in held}) == 40
    for p in held:
        r = env.reward(p, env.demonstrate(p))
        assert (r.score, r.correct) == (1.0, True), (p.messages, r.info)
        assert is_heldout("instruct", p.messages[0]["content"])
        assert env.tool_results(p, []) == []
    held_ids, held_prompts = {p.id for p in held}, {p.messages[0]["content"] for p in held}
    rng = random.Random(0)
    for _ in range(500 if level == "easy" else 200):
        p = env.sample(rng)
        assert p.id not in held_ids and p.messages[0]["content"] not in held_prompts
        assert env.reward(p, env.demonstrate(p)).correct


def test_sample_is_deterministic_by_seed():
    env = InstructEnv("hard")
    a = [env.sample(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert env.sample(random.Random(8)) != a[0] or env.sample(random.Random(9)) != a[0]


def test_easy_is_one_short_instruction():
    env = InstructEnv("easy")
    p = env.sample(random.Random(3))
    word = p.answer["constraints"][0][1]
    assert len(p.messages[0]["content"].split()) <= 8 and word in p.messages[0]["content"]
    assert env.demonstrate(p)[0]["content"].lower() == word
    case = p.answer["constraints"][1][0]
    wrong = word.lower() if case == "uppercase" else word.upper()
    r = env.reward(p, reply(wrong))
    assert r.score == pytest.approx(2 / 3) and not r.correct and r.info["failed"] == [case]
    r = env.reward(p, reply(f"{env.demonstrate(p)[0]['content']} {env.demonstrate(p)[0]['content']}"))
    assert r.info["failed"] == ["max_words:1"]


def test_each_violation_names_its_constraint():
    cases = {  # constraint -> (a reply that meets it, one that does not)
        Constraint("uppercase"): ("HELLO WORLD", "Hello world"),
        Constraint("lowercase"): ("hello world", "Hello world"),
        Constraint("include", "moss"): ("green Moss here", "mossy ground"),
        Constraint("avoid", "snow"): ("snowfall only", "cold snow"),
        Constraint("max_words", 3): ("one two three", "one two three four"),
        Constraint("min_words", 3): ("one two three", "one two"),
        Constraint("max_chars", 5): ("abcde", "abcdef"),
        Constraint("json_keys", ("a", "b")): ('{"b": 1, "a": [2]}', '{"a": 1}'),
        Constraint("bullets", 2): ("- x\n- y\nThe end.", "- x\n- y\n- z"),
        Constraint("ends_with", "The end."): ("words. the END.", "The end. more"),
    }
    assert {c.kind for c in cases} == set(KINDS)
    for c, (good, bad) in cases.items():
        assert c.check(good) and not c.check(bad), c.name
    assert not Constraint("json_keys", ("a",)).check("not json") and not Constraint("json_keys", ("a",)).check("[1]")
    assert not Constraint("uppercase").check("123")   # no letters: not a reply in uppercase


def test_partial_reward_on_a_hard_problem():
    env = InstructEnv("hard")
    rng = random.Random(1)
    problems = iter(lambda: env.sample(rng), None)
    p = next(p for p in problems if any(k == "json_keys" for k, _ in p.answer["constraints"]))
    keys = next(a for k, a in p.answer["constraints"] if k == "json_keys")
    r = env.reward(p, reply(json.dumps({k: "x" for k in keys[:-1]})))
    assert not r.correct and r.score < 1 and f"json_keys:{','.join(keys)}" in r.info["failed"]
    assert r.info["verdicts"].keys() == {Constraint(k, tuple(a) if isinstance(a, list) else a).name
                                         for k, a in p.answer["constraints"]}


def test_missing_reply_scores_zero_and_bad_input_is_named():
    env = InstructEnv("medium")
    p = env.heldout(1)[0]
    for turns in ([], [{"role": "user", "content": "x"}]):
        r = env.reward(p, turns)
        assert (r.score, r.correct) == (0.0, False) and "no final" in r.info["error"]
    with pytest.raises(InvalidArgument, match="level='trivial'"):
        InstructEnv("trivial")
    with pytest.raises(InvalidArgument, match="only .* held-out"):
        InstructEnv("easy").heldout(10_000)
