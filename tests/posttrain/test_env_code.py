"""The code environment: protocol, reference solutions pass every hidden test of held-out problems, wrong,
malformed, looping or crashing code scores 0 for the tests it breaks, and model code never runs in here."""
from __future__ import annotations

import random

import pytest

import dsv4
from dsv4.errors import InvalidArgument
from dsv4.posttrain.envs import Environment
from dsv4.posttrain.envs.code import FAMILIES, LEVELS, CodeEnv, extract_code
from dsv4.posttrain.sandbox import Limits


def _reply(code: str) -> list[dict]:
    return [{"role": "assistant", "reasoning_content": "", "content": f"Here it is:\n```python\n{code}\n```"}]


@pytest.fixture(scope="module")
def easy():
    return CodeEnv("easy")


@pytest.fixture(scope="module")
def add_problem(easy):
    return next(p for p in easy.heldout(30) if p.meta["family"] == "add")


@pytest.mark.parametrize("level", LEVELS)
def test_conforms_to_the_protocol(level):
    env = CodeEnv(level)
    assert isinstance(env, Environment)
    assert env.name == "code" and env.max_turns == 1
    problem = env.sample(random.Random(0))
    assert problem.domain == "code" and problem.messages[-1]["role"] == "user"
    assert env.tool_results(problem, []) == []


@pytest.mark.parametrize("level", LEVELS)
def test_demonstrations_pass_every_test_of_heldout_problems(level):
    env = CodeEnv(level)
    heldout = env.heldout(12)
    assert len({p.id for p in heldout}) == 12
    for problem in heldout:
        turns = env.demonstrate(problem)
        assert extract_code(turns[-1]["content"]) is not None
        reward = env.reward(problem, turns)
        assert reward.correct and reward.score == 1.0, (problem.id, reward)


def test_every_family_has_a_working_reference_solution():
    for family in FAMILIES:
        env = CodeEnv(family.level, families=(family.name,))
        problem = env.sample(random.Random(3))
        assert env.reward(problem, env.demonstrate(problem)).correct, family.name


def test_sampled_problems_never_are_heldout_ones(easy):
    heldout = {p.id for p in easy.heldout(30)}
    rng = random.Random(1)
    sampled = {easy.sample(rng).id for _ in range(600)}
    assert not heldout & sampled
    assert len(sampled) > 60


def test_same_seed_same_problems():
    env = CodeEnv("medium")
    assert [env.sample(random.Random(5)) for _ in range(3)] == [env.sample(random.Random(5)) for _ in range(3)]
    assert env.heldout(5) == CodeEnv("medium").heldout(5)


@pytest.mark.parametrize("code, why", [
    ("def f(x):\n    return None", "wrong answer"),
    ("def f(x) return x", "syntax error"),
    ("def g(x):\n    return x", "missing function"),
    ("def f(x):\n    while True:\n        pass", "infinite loop"),
    ("import os\nos.abort()", "crash"),
    ("def f(x):\n    return [1] * 10 ** 9", "memory hog"),
    ("def f(x):\n    import os\n    os.write(1, b'@@dsv4-result 0 {\"i\": 0, \"value\": 1}\\n')", "forged result line"),
])
def test_bad_code_scores_zero(easy, add_problem, code, why):
    reward = easy.reward(add_problem, _reply(code))
    assert reward.score == 0.0 and not reward.correct, (why, reward)


def test_missing_code_block_scores_zero(easy, add_problem):
    solution = add_problem.meta["solution"]
    assert easy.reward(add_problem, [{"role": "assistant", "content": solution}]).score == 0.0
    assert easy.reward(add_problem, [{"role": "assistant", "reasoning_content": f"```python\n{solution}\n```",
                                      "content": ""}]).score == 0.0
    assert easy.reward(add_problem, []).score == 0.0


def test_partial_credit_is_the_fraction_of_tests_passed(easy, add_problem):
    k = add_problem.meta["params"]["k"]
    code = f"def f(x):\n    if x == 0:\n        raise ValueError('no')\n    print('noise')\n    return x + {k}"
    reward = easy.reward(add_problem, _reply(code))
    total = len(add_problem.answer["inputs"])
    assert reward.info["passed"] == total - 1 and reward.score == pytest.approx((total - 1) / total)
    assert not reward.correct and "ValueError" in reward.info["errors"]


def test_answers_must_match_exactly(easy):
    problem = next(p for p in easy.heldout(30) if p.meta["family"] == "divisible")
    k = problem.meta["params"]["k"]
    assert easy.reward(problem, _reply(f"def f(x):\n    return x % {k} == 0")).correct
    assert not easy.reward(problem, _reply(f"def f(x):\n    return int(x % {k} == 0)")).correct   # 1 is not True


def test_model_code_runs_outside_this_process(easy, add_problem):
    code = "import sys\nsys.modules.setdefault('dsv4', sys).SANDBOX_ESCAPED = True\ndef f(x):\n    return x"
    easy.reward(add_problem, _reply(code))
    assert not hasattr(dsv4, "SANDBOX_ESCAPED")


def test_extract_code_takes_the_last_block():
    assert extract_code("```python\na = 1\n```\ntext\n```\nb = 2\n```") == "b = 2\n"
    assert extract_code("no block") is None


def test_bad_arguments():
    with pytest.raises(InvalidArgument, match="level"):
        CodeEnv("expert")
    with pytest.raises(InvalidArgument, match="families"):
        CodeEnv("easy", families=("fizzbuzz",))
    with pytest.raises(InvalidArgument, match="held-out"):
        CodeEnv("easy").heldout(10_000)


def test_reward_batch_scores_each_reply_alone():
    """Good replies among a top-level loop, a fork bomb, a flood of output, a crash and a reply without code:
    each good one scores what it scores alone (1.0), each bad one 0, in one batch."""
    env = CodeEnv("easy", limits=Limits(timeout_s=1.0, cpu_s=1, output_bytes=10_000))
    problems = env.heldout(6)
    bad = ["while True:\n    pass", "import os\nwhile True:\n    os.fork()",
           "import os\nwhile True:\n    os.write(1, b'x' * 999)", "import os\nos.abort()"]
    items = []
    for k, p in enumerate(problems):
        items.append((p, env.demonstrate(p)))
        if k < len(bad):
            items.append((p, _reply(bad[k])))
    items.append((problems[0], [{"role": "assistant", "content": "no code here"}]))
    rewards = env.reward_batch(items)
    is_good = [turns[-1]["content"].startswith("```python\ndef") for _, turns in items]
    assert sum(is_good) == 6 and all(r.correct and r.score == 1.0 for r, g in zip(rewards, is_good) if g)
    others = [r for r, g in zip(rewards, is_good) if not g]
    assert [r.score for r in others] == [0.0] * (len(bad) + 1)
    killed = [r.info.get("killed") for r in others]
    assert killed[2] == "output_limit" and killed[3] == "signal SIGABRT" and killed[0] in ("cpu_limit", "timeout")
    assert "PermissionError" in others[1].info["load_error"]
