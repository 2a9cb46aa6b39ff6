"""Stop strings and the streamed chat reply: any split of the text gives the unsplit result, markup never
reaches the content, and tool calls survive a missing </think>."""
import json
import os

import pytest

from dsv4.generate.chat import EOS, THINK_END, encode_chat, parse_completion
from dsv4.serve.textstream import ReplyParser, StopCutter

VECTORS = os.path.join(os.path.dirname(__file__), "..", "fixtures", "deepseek-v4-chat-encoding")


def splits(text: str):
    """The text whole, cut at every single boundary, at every pair of boundaries (short texts), and char by char."""
    yield [text]
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    if len(text) <= 60:
        for i in range(1, len(text)):
            for j in range(i + 1, len(text)):
                yield [text[:i], text[i:j], text[j:]]
    yield list(text)


def run_parser(pieces, thinking):
    p = ReplyParser(thinking)
    deltas = [d for piece in pieces for d in p.push(piece)]
    tail, calls = p.finish()
    deltas += tail
    join = {f: "".join(t for g, t in deltas if g == f) for f in ("reasoning_content", "content")}
    return join, calls, deltas


def run_cutter(pieces, stops):
    c = StopCutter(stops)
    out = "".join(c.push(p) for p in pieces) + c.flush()
    return out, c.stopped


@pytest.mark.parametrize("text,stops,expected,stopped", [
    ("Hello world. Bye", ["world"], "Hello ", True),
    ("Hello world. Bye", ["xyz"], "Hello world. Bye", False),
    ("aaab", ["aab"], "a", True),
    ("one\n\ntwo", ["\n\n", "o"], "", True),
    ("abc", ["c", "bc"], "a", True),
    ("abcab", ["abd"], "abcab", False),
])
def test_stop_strings_cut_at_first_under_any_split(text, stops, expected, stopped):
    for pieces in splits(text):
        assert run_cutter(pieces, stops) == (expected, stopped), pieces


def test_stop_cutter_never_releases_part_of_a_stop():
    c = StopCutter(["STOP"])
    assert c.push("abcST") == "abc"
    assert c.push("O") == ""
    assert c.push("P and more") == "" and c.stopped


CALL = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="location" string="true">Paris</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
        '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')


@pytest.mark.parametrize("text,thinking", [
    ("Just an answer." + EOS, False),
    ("line one\n\nline two\n" + EOS, False),
    ("I should look it up." + THINK_END + "Let me check." + CALL + EOS, True),
    ("hmm" + THINK_END + "The answer is 4." + EOS, True),
    ("" + CALL + EOS, False),
    ("Sure." + CALL + EOS, False),
])
def test_parser_matches_parse_completion_under_any_split(text, thinking):
    want = parse_completion(text, thinking=thinking)
    for pieces in splits(text):
        got, calls, deltas = run_parser(pieces, thinking)
        assert got["content"] == want["content"] and got["reasoning_content"] == want["reasoning_content"], pieces
        assert calls == want["tool_calls"]
        assert not any("DSML" in t or t.startswith("\n\n<") for _, t in deltas)


def test_official_fixture_replies_parse_like_parse_completion():
    """Every assistant reply of the official vectors (thinking mode), streamed one character at a time."""
    with open(os.path.join(VECTORS, "output_1.txt"), encoding="utf-8") as f:
        prompt = f.read()
    replies = [part.split("<｜User｜>")[0] for part in prompt.split("<｜Assistant｜><think>")[1:]]
    replies = [r for r in replies if r.endswith(EOS)]
    assert replies
    for r in replies:
        want = parse_completion(r, thinking=True)
        got, calls, _ = run_parser(list(r), True)
        assert (got["content"], got["reasoning_content"], calls) == (
            want["content"], want["reasoning_content"], want["tool_calls"])


def test_missing_think_end_does_not_trap_tool_calls():
    text = "I need the weather." + CALL + EOS
    with pytest.raises(ValueError):
        parse_completion(text, thinking=True)
    for pieces in splits(text):
        got, calls, _ = run_parser(pieces, True)
        assert got == {"reasoning_content": "I need the weather.", "content": ""}
        assert [c["function"]["name"] for c in calls] == ["get_weather"]
        assert json.loads(calls[0]["function"]["arguments"]) == {"location": "Paris", "days": 3}


def test_cut_short_reply_keeps_its_text():
    """No EOS (max_tokens reached): what came is the reply; a partial marker at the end is text, not markup."""
    for text, thinking, want in [("thinking so far\n", True, {"reasoning_content": "thinking so far\n", "content": ""}),
                                 ("answer </thi", False, {"reasoning_content": "", "content": "answer </thi"}),
                                 ("answer\n\n<｜DS", False, {"reasoning_content": "", "content": "answer\n\n<｜DS"})]:
        for pieces in splits(text):
            got, calls, _ = run_parser(pieces, thinking)
            assert got == want and calls == []


def test_malformed_tool_block_is_returned_as_content():
    text = "ok" + "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke nme=" + EOS
    got, calls, _ = run_parser([text], False)
    assert calls == [] and got["content"] == "ok\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke nme="


def test_round_trip_with_encoder():
    """A reply the encoder writes for a tool-calling assistant turn parses back to the same calls."""
    msg = {"role": "assistant", "content": "", "reasoning_content": "r",
           "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"a": "x", "b": [1, 2]}'}}]}
    prompt = encode_chat([{"role": "user", "content": "hi"}, msg], thinking=True, drop_thinking=False)
    reply = prompt.split("<｜Assistant｜><think>")[1]
    got, calls, _ = run_parser(list(reply), True)
    assert got["reasoning_content"] == "r"
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": "x", "b": [1, 2]}
