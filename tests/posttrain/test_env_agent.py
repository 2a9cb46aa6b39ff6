"""Agent environment: tool calls in the V4 format round-trip, tool errors are results, rewards on the final answer."""
import json
import random
from fractions import Fraction

import pytest

from dsv4.generate.chat import encode_chat, parse_completion
from dsv4.posttrain.envs import Environment
from dsv4.posttrain.envs.agent import TOOLS, AgentEnv, run_tool
from dsv4.posttrain.envs.calculator import CalculatorError, calculate, format_number

LEVELS = ("easy", "medium", "hard")


def call(name, arguments, id=None):
    c = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {**c, "id": id} if id else c


def calls_of(message):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls") or ()]


@pytest.mark.parametrize("level", LEVELS)
def test_protocol_demonstrations_and_split(level):
    env = AgentEnv(level)
    assert isinstance(env, Environment) and env.name == "agent" and env.max_turns > 1
    held = env.heldout(30)
    assert env.heldout(30) == held and len({p.id for p in held}) == 30
    for p in held:
        assert p.messages[0]["tools"] == TOOLS
        demo = env.demonstrate(p)
        assert demo[0]["tool_calls"] and demo[-1]["role"] == "assistant" and not demo[-1].get("tool_calls")
        assert sum(m["role"] == "assistant" for m in demo) <= env.max_turns
        r = env.reward(p, demo)
        assert r.correct and r.score == 1.0 and r.info["tool_errors"] == 0, r.info
    ids = {p.id for p in held}
    rng = random.Random(0)
    for _ in range(200):
        assert env.sample(rng).id not in ids


@pytest.mark.parametrize("thinking", [False, True])
def test_demonstrations_round_trip_the_official_encoding(thinking):
    env = AgentEnv("medium")
    for p in env.heldout(12):
        context = list(p.messages)
        assert "## Tools" in encode_chat(context, thinking) and '"name": "calculator"' in encode_chat(context)
        for m in env.demonstrate(p):
            if m["role"] == "assistant":
                text = encode_chat([m], thinking, context=context)
                back = parse_completion(text, thinking)
                assert calls_of(back) == calls_of(m) and back["content"] == m["content"]
            context.append(m)
        full = encode_chat(context, thinking)
        assert full.count("<tool_result>") == sum(m["role"] == "tool" for m in context)


def test_facts_come_only_from_the_problem_table_and_need_the_tool():
    env = AgentEnv("easy")
    rng = random.Random(2)
    lookups = [p for p in (env.sample(rng) for _ in range(40)) if p.answer["plan"][0][0][0] == "search"]
    assert len({p.answer["seed"] for p in lookups}) == len(lookups)        # a fresh table per problem
    p = lookups[0]
    query = p.answer["plan"][0][0][1]
    result = env.tool_results(p, [call("search", json.dumps({"query": query}), id="c7")])
    assert result == [{"role": "tool", "tool_call_id": "c7", "content": f"{query.lower()}: {p.answer['value']}"}]
    attribute, city = query.split(" of ")
    reordered = call("search", {"query": f"The {city} {attribute}?"})
    assert str(p.answer["value"]) in run_tool(p.answer["seed"], reordered)
    assert run_tool(p.answer["seed"], call("search", {"query": "population of Atlantis"})).startswith("no result")


def test_tool_errors_are_tool_results_not_exceptions():
    env = AgentEnv("easy")
    p = env.heldout(1)[0]
    bad = [call("calc", "{}"), None, {"function": "x"}, call("calculator", "{not json"),
           call("calculator", '["1+1"]'), call("calculator", "{}"), call("calculator", '{"expression": "1", "x": 2}'),
           call("calculator", '{"expression": [1]}'), call("calculator", '{"expression": "1/0"}'),
           call("calculator", '{"expression": "__import__(\'os\')"}'),
           call("calculator", json.dumps({"expression": "(" * 300})),
           call("search", '{"query": null}')]
    results = env.tool_results(p, bad)
    assert [m["role"] for m in results] == ["tool"] * len(bad)
    assert [m["tool_call_id"] for m in results] == [f"call_{i}" for i in range(len(bad))]
    assert all(m["content"].startswith("error: ") for m in results), [m["content"] for m in results]
    assert "unknown tool 'calc'" in results[0]["content"] and "division by zero" in results[8]["content"]
    good = env.tool_results(p, [call("calculator", {"expression": 12})])   # a number where a string is expected
    assert good[0]["content"] == "12"


def test_calculator_is_exact_and_bounded():
    assert calculate("2 * (3 + 4) - -5") == 19 and calculate("1/3 + 1/6") == Fraction(1, 2)
    assert format_number(calculate("10 / 4")) == "2.5" and format_number(calculate("2/3")) == "0.666667"
    assert format_number(calculate("((7))")) == "7" and format_number(Fraction(-1, 10**9)) == "0"
    for text, why in [("", "empty"), ("1 +", "too early"), ("1 2", "after a complete"), ("2 ** 3", "unexpected"),
                      ("(1", "missing"), ("-" * 50 + "1", "deeper"), ("1+" * 150 + "1", "longer")]:
        with pytest.raises(CalculatorError, match=why):
            calculate(text)


def test_reward_reads_the_final_answer():
    env = AgentEnv("easy")
    p = env.heldout(1)[0]
    demo = env.demonstrate(p)
    value = p.answer["value"]
    assert not env.reward(p, demo[:-1]).correct and "no final answer" in env.reward(p, demo[:-1]).info["error"]
    assert env.reward(p, []).score == 0.0
    assert env.reward(p, demo[:-1] + [{"role": "assistant", "content": f"It is {value:,}."}]).correct
    wrong = env.reward(p, demo[:-1] + [{"role": "assistant", "content": str(value + 1)}])
    assert (wrong.score, wrong.correct, wrong.info["expected"]) == (0.0, False, value)
    assert "no number" in env.reward(p, [{"role": "assistant", "content": "I do not know"}]).info["error"]


def test_sample_is_deterministic_by_seed():
    env = AgentEnv("hard")
    assert env.sample(random.Random(5)) == env.sample(random.Random(5))
    assert env.demonstrate(env.sample(random.Random(5))) == env.demonstrate(env.sample(random.Random(5)))
