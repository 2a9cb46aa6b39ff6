"""V4 chat format: the four official encoding vectors, completion parsing, round trips and bad input."""
import copy
import json
import os

import pytest

from dsv4.generate.chat import ASSISTANT, BOS, EOS, THINK_END, THINK_START, USER, encode_chat, parse_completion

VECTORS = os.path.join(os.path.dirname(__file__), "..", "fixtures", "deepseek-v4-chat-encoding")
MODES = {1: True, 2: True, 3: True, 4: False}   # case -> thinking, as in the upstream test


def load(case: int) -> tuple[list[dict], str]:
    """Messages and expected prompt of official case N (case 1 keeps its tools beside the messages)."""
    with open(os.path.join(VECTORS, f"input_{case}.json"), encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict):
        messages = data["messages"]
        messages[0]["tools"] = data["tools"]
    else:
        messages = data
    with open(os.path.join(VECTORS, f"output_{case}.txt"), encoding="utf-8") as f:
        return messages, f.read()


def assistant_turns(prompt: str) -> list[str]:
    """The text after each thinking-mode assistant opener, up to the next user turn."""
    marker = ASSISTANT + THINK_START
    return [part.split(USER)[0] for part in prompt.split(marker)[1:]]


@pytest.mark.parametrize("case", [1, 2, 3, 4])
def test_official_vectors(case):
    messages, expected = load(case)
    before = copy.deepcopy(messages)
    assert encode_chat(messages, thinking=MODES[case]) == expected
    assert messages == before   # the caller's messages are not modified


def test_case_1_parse_tool_call_and_answer():
    messages, _ = load(1)
    first, last = assistant_turns(encode_chat(messages, thinking=True))
    call = parse_completion(first, thinking=True)
    assert call["reasoning_content"] == "The user wants to know the weather in Beijing. I should use the get_weather tool."
    assert call["content"] == ""
    assert [c["function"]["name"] for c in call["tool_calls"]] == ["get_weather"]
    assert json.loads(call["tool_calls"][0]["function"]["arguments"]) == {"location": "Beijing", "unit": "celsius"}
    answer = parse_completion(last, thinking=True)
    assert answer["reasoning_content"] == "Got the weather data. Let me format a nice response."
    assert "22°C" in answer["content"]
    assert answer["tool_calls"] == []


def test_case_2_parse_and_dropped_reasoning():
    messages, _ = load(2)
    prompt = encode_chat(messages, thinking=True)
    parsed = parse_completion(assistant_turns(prompt)[-1], thinking=True)
    assert parsed == {"role": "assistant", "content": "The capital of France is Paris.",
                      "reasoning_content": "The user asks about the capital of France. It is Paris.", "tool_calls": []}
    assert "The user said hello" not in prompt   # reasoning before the last user turn is dropped
    assert "The user said hello" in encode_chat(messages, thinking=True, drop_thinking=False)


@pytest.mark.parametrize("case", [1, 2, 3, 4])
def test_last_turn_round_trip(case):
    """prompt + completion == encode(history + [parse(completion)]) for each official last turn."""
    messages, expected = load(case)
    prompt = encode_chat(messages[:-1], thinking=MODES[case])
    assert expected.startswith(prompt)
    parsed = parse_completion(expected[len(prompt):], thinking=MODES[case])
    assert parsed["content"] == messages[-1]["content"]
    assert encode_chat(messages[:-1] + [parsed], thinking=MODES[case]) == expected


@pytest.mark.parametrize("thinking", [True, False])
def test_tool_call_round_trip(thinking):
    args = [{"q": "a \"quoted\" <b>", "n": 3, "flags": [True, None], "opts": {"x": 1.5}}, {}]
    history = [{"role": "system", "content": "s"}, {"role": "user", "content": "go"}]
    reply = {"role": "assistant", "content": "calling", "reasoning_content": "plan" if thinking else "",
             "tool_calls": [{"type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                            for n, a in zip(["search", "noop"], args)]}
    prompt = encode_chat(history, thinking)
    assert prompt.endswith(ASSISTANT + (THINK_START if thinking else THINK_END))
    full = encode_chat(history + [reply], thinking)
    parsed = parse_completion(full[len(prompt):], thinking)
    assert [json.loads(c["function"]["arguments"]) for c in parsed["tool_calls"]] == args
    assert parsed == reply
    assert encode_chat(history + [parsed], thinking) == full


def test_tool_results_join_user_turn_in_call_order():
    calls = [{"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in ("a", "b")]
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "b", "content": "B"},
                {"role": "tool", "tool_call_id": "a", "content": "A"}]
    prompt = encode_chat(messages)
    assert prompt.endswith(EOS + USER + "<tool_result>A</tool_result>\n\n<tool_result>B</tool_result>"
                           + ASSISTANT + THINK_END)


def test_context_is_not_emitted():
    context = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
               {"role": "assistant", "content": "hello"}]
    messages = [{"role": "user", "content": "again"}]
    tail = encode_chat(messages, context=context)
    assert not tail.startswith(BOS)
    assert encode_chat(context) + tail == encode_chat(context + messages)


def test_reasoning_effort_max_only_in_thinking_mode():
    messages = [{"role": "user", "content": "hi"}]
    assert encode_chat(messages, True, reasoning_effort="max").startswith(BOS + "Reasoning Effort: Absolute maximum")
    assert encode_chat(messages, False, reasoning_effort="max") == encode_chat(messages, False)
    assert encode_chat(messages, True, reasoning_effort="high") == encode_chat(messages, True)


@pytest.mark.parametrize("messages, kwargs, problem", [
    ([{"role": "robot", "content": "x"}], {}, "unknown role 'robot'"),
    ([{"content": "x"}], {}, "unknown role None"),
    ([{"role": "user", "content": "x", "task": "summarise"}], {}, "unknown task 'summarise'"),
    ([{"role": "developer", "content": ""}], {}, "developer message needs non-empty content"),
    ([{"role": "user", "content": "x"}], {"reasoning_effort": "low"}, "reasoning_effort"),
    ([{"role": "user", "content": "x"}], {"thinking": "thinking"}, "thinking must be True or False"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], {}, "JSON object"),
])
def test_bad_input_raises(messages, kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        encode_chat(messages, **kwargs)


CALL = '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="k" string="true">v</｜DSML｜parameter>'


@pytest.mark.parametrize("text, thinking", [
    ("no end of sentence", False),
    ("reasoning without a close" + EOS, True),
    ("answer" + EOS + "more", False),
    ("answer </think>" + EOS, False),
    (CALL + "\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>trailing" + EOS, False),
    (CALL + "\n" + CALL[CALL.index("<｜DSML｜parameter"):] + "\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS, False),
    (CALL.replace('string="true"', 'string="yes"') + "\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS, False),
    (CALL + "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS, False),
])
def test_malformed_completion_raises(text, thinking):
    with pytest.raises(ValueError):
        parse_completion(text, thinking)
