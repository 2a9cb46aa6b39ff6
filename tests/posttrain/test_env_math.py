"""The math environment: protocol, solver demonstrations score 1, wrong or malformed answers score 0, held-out
problems never come out of `sample`, the same seed gives the same problems."""
from __future__ import annotations

import random

import pytest

from dsv4.errors import InvalidArgument
from dsv4.posttrain.envs import Environment
from dsv4.posttrain.envs.math import LEVELS, ExpressionError, MathEnv, evaluate, parse_expression

ENVS = [MathEnv(level) for level in LEVELS] + [MathEnv("easy", kinds=("countdown",))]
IDS = [f"{e.level.name}-{'+'.join(e.kinds)}" for e in ENVS]


def _answer(text: str) -> list[dict]:
    return [{"role": "assistant", "reasoning_content": "", "content": text}]


@pytest.mark.parametrize("env", ENVS, ids=IDS)
def test_conforms_to_the_protocol(env):
    assert isinstance(env, Environment)
    assert env.name == "math" and env.max_turns == 1
    problem = env.sample(random.Random(0))
    assert problem.domain == "math" and problem.messages[-1]["role"] == "user"
    assert env.tool_results(problem, []) == []


@pytest.mark.parametrize("env", ENVS, ids=IDS)
def test_demonstrations_solve_every_heldout_problem(env):
    heldout = env.heldout(50)
    assert len({p.id for p in heldout}) == 50
    for problem in heldout:
        turns = env.demonstrate(problem)
        assert turns[-1]["content"].startswith("Answer: ")
        reward = env.reward(problem, turns)
        assert reward.correct and reward.score == 1.0, (problem, turns, reward)


@pytest.mark.parametrize("env", ENVS, ids=IDS)
def test_sampled_problems_never_are_heldout_ones(env):
    heldout = {p.id for p in env.heldout(50)}
    rng = random.Random(1)
    sampled = {env.sample(rng).id for _ in range(1000)}
    assert not heldout & sampled
    assert len(sampled) > 100


def test_heldout_is_fixed_and_prefix_stable():
    env = MathEnv("medium")
    assert [p.id for p in env.heldout(20)] == [p.id for p in MathEnv("medium").heldout(40)[:20]]


def test_same_seed_same_problems():
    env = MathEnv("medium")
    a = [env.sample(random.Random(7)) for _ in range(3)]
    b = [env.sample(random.Random(7)) for _ in range(3)]
    assert a == b
    rng = random.Random(7)
    assert len({env.sample(rng).id for _ in range(20)}) > 10


def test_easy_problems_are_short_single_digit_sums():
    env = MathEnv("easy")
    rng = random.Random(0)
    for _ in range(200):
        problem = env.sample(rng)
        prompt = problem.messages[0]["content"]
        assert len(prompt) <= 8 and prompt.endswith("=?")
        assert all(len(n) == 1 for n in prompt[:-2].replace("-", "+").split("+"))


def test_arith_reward_parses_the_final_answer():
    env = MathEnv("easy")
    problem = next(p for p in env.heldout(50) if p.answer == 6)
    assert env.reward(problem, _answer("Answer: 6")).correct
    assert env.reward(problem, _answer("some working\n  answer :   6 \n")).correct
    assert env.reward(problem, _answer("Answer: 6.")).correct
    assert env.reward(problem, _answer("Answer: 5\nAnswer: 6")).correct     # the last one counts
    for wrong in ("Answer: 7", "6", "Answer: six", "Answer: 6+0", "Answer:", ""):
        reward = env.reward(problem, _answer(wrong))
        assert reward.score == 0.0 and not reward.correct, wrong
    # the answer must be in the final message's content, not in its reasoning
    assert not env.reward(problem, [{"role": "assistant", "reasoning_content": "Answer: 6", "content": ""}]).correct
    assert not env.reward(problem, []).correct


def test_countdown_reward_checks_value_and_numbers():
    env = MathEnv("medium", kinds=("countdown",))
    problem = env.heldout(1)[0]
    numbers, target = problem.answer["numbers"], problem.answer["target"]
    solution = problem.meta["solution"]
    assert evaluate(parse_expression(solution)) == target
    assert env.reward(problem, _answer(f"Answer: ( {solution} )")).correct
    assert not env.reward(problem, _answer(f"Answer: {target}")).correct                 # numbers not used
    assert not env.reward(problem, _answer(f"Answer: {solution}+0")).correct              # an extra number
    assert not env.reward(problem, _answer(f"Answer: {solution}+1")).correct              # wrong value
    assert not env.reward(problem, _answer("Answer: __import__('os')")).correct          # not arithmetic
    assert not env.reward(problem, _answer("Answer: " + "+".join(map(str, numbers)) + "*1")).correct


@pytest.mark.parametrize("text, value", [("1+2*3", 7), ("(1+2)*3", 9), ("10-4-3", 3), ("10-(4-3)", 9),
                                         (" 2 * ( 3 + 4 ) - 5 ", 9)])
def test_parser_precedence(text, value):
    assert evaluate(parse_expression(text)) == value


@pytest.mark.parametrize("text", ["1+", "(1+2", "1+2)", "-1", "2**3", "1/2", "a", "1 2", "(" * 40 + "1" + ")" * 40,
                                  "1+" * 200 + "1"])
def test_parser_rejects_non_arithmetic(text):
    with pytest.raises(ExpressionError):
        parse_expression(text)


def test_bad_arguments():
    with pytest.raises(InvalidArgument, match="level"):
        MathEnv("impossible")
    with pytest.raises(InvalidArgument, match="kinds"):
        MathEnv("easy", kinds=("calculus",))
    with pytest.raises(InvalidArgument, match="n"):
        MathEnv("easy").heldout(-1)
