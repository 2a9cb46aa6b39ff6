"""chat_data: V4-encoded conversations, the assistant-only loss mask, prompts and continuations for rollouts."""
import json

import pytest
import sft_fixtures as fx

from dsv4.generate.chat import EOS, encode_chat
from dsv4.posttrain.chat_data import (ChatDataError, encode_continuation, encode_conversation, encode_prompt,
                                      load_examples, read_conversations, with_tools)

CALLS = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="calc">\n'
         '<｜DSML｜parameter name="expr" string="true">12*12</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>')


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return fx.tokenizer(tmp_path_factory.mktemp("tok"))


def _runs(tok, ex):
    """The decoded text of each maximal run of masked-in tokens."""
    runs, cur = [], []
    for t, m in zip(ex.tokens + [None], ex.mask + [0]):
        if m:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


@pytest.mark.parametrize("conv, thinking, want", [
    (fx.PLAIN, False, ["5" + EOS, "It is 8." + EOS]),
    (fx.THINKING, True, ["7 times 6 is 42.</think>42" + EOS]),
    (fx.TOOLS, False, ["Let me compute." + CALLS + EOS, "12 times 12 is 144." + EOS]),
    (fx.TOOLS, True, ["</think>Let me compute." + CALLS + EOS, "</think>12 times 12 is 144." + EOS]),
])
def test_mask_decodes_to_exactly_the_assistant_turns(tok, conv, thinking, want):
    ex = encode_conversation(tok, with_tools(conv["messages"], conv.get("tools")), thinking)
    assert _runs(tok, ex) == want
    text = encode_chat(with_tools(conv["messages"], conv.get("tools")), thinking)
    assert tok.decode(ex.tokens) == text
    # the pieces' ids joined are the whole rendered text's ids
    assert ex.tokens == tok.encode(text)
    assert ex.mask[0] == 0 and ex.tokens[0] == tok.bos_id and ex.tokens[-1] == tok.eos_id and ex.mask[-1] == 1


def test_non_thinking_opener_is_template(tok):
    """Non-thinking: the opener's </think> is the template's; thinking: the model writes </think> itself."""
    ex = encode_conversation(tok, fx.PLAIN["messages"], False)
    first = ex.mask.index(1)
    assert tok.decode(ex.tokens[first - 2:first]) == "<｜Assistant｜></think>"
    ex = encode_conversation(tok, fx.THINKING["messages"], True)
    first = ex.mask.index(1)
    assert tok.decode(ex.tokens[first - 2:first]) == "<｜Assistant｜><think>"


@pytest.mark.parametrize("thinking", [False, True])
def test_rollout_pieces_tokenize_like_sft(tok, thinking):
    """prompt + sampled assistant turn + continuation (tool result) + next assistant turn = the SFT tokens."""
    msgs = with_tools(fx.TOOLS["messages"], fx.TOOLS["tools"])   # [system, user, assistant, tool, assistant]
    ex = encode_conversation(tok, msgs, thinking)
    prompt = encode_prompt(tok, msgs[:2], thinking)
    runs = [i for i, m in enumerate(ex.mask) if m]
    assert ex.tokens[:len(prompt)] == prompt and ex.mask[len(prompt)] == 1 and not any(ex.mask[:len(prompt)])
    end_first = ex.tokens.index(tok.eos_id, len(prompt)) + 1
    cont = encode_continuation(tok, msgs[:3], msgs[3:4], thinking)
    assert ex.tokens[end_first:end_first + len(cont)] == cont
    assert not any(ex.mask[end_first:end_first + len(cont)]) and ex.mask[end_first + len(cont)] == 1
    assert runs[-1] == len(ex.tokens) - 1
    assert tok.decode(cont).startswith("<｜User｜><tool_result>144</tool_result><｜Assistant｜>")


def test_conversation_thinking_flag_overrides_default(tmp_path, tok):
    path = fx.write_jsonl(tmp_path / "d.jsonl", fx.CONVERSATIONS)
    exs = load_examples(path, tok, thinking=False)
    assert [_runs(tok, e)[0] for e in exs[:2]] == ["5" + EOS, "7 times 6 is 42.</think>42" + EOS]
    assert exs[1].where == f"{path}:2"


def test_openai_variants_are_normalised(tmp_path, tok):
    """Content as text parts and tool-call arguments as an object read like their plain forms."""
    conv = json.loads(json.dumps(fx.TOOLS))
    conv["messages"][0]["content"] = [{"type": "text", "text": "Compute 12 "}, {"type": "text", "text": "times 12."}]
    conv["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"expr": "12*12"}
    a, b = load_examples(fx.write_jsonl(tmp_path / "d.jsonl", [conv, fx.TOOLS]), tok)
    assert a.tokens == b.tokens and a.mask == b.mask


@pytest.mark.parametrize("line, match", [
    ('{"messages": [', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"messages": []}', "non-empty list"),
    ('{"msgs": []}', r"unknown field\(s\) \['msgs'\]"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "message 0 has unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": 5}]}', "message 0 content must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}], "thinking": "yes"}', "'thinking' must be true or false"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": '
     '{"name": "calc", "arguments": "not json"}}]}]}', "message 1 tool call 0 \\(calc\\): arguments must be"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"id": 1}]}]}',
     "message 1 tool call 0"),
    ('{"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "calc"}]}', "'tools' must be a list"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, match):
    path = fx.write_jsonl(tmp_path / "bad.jsonl", [fx.PLAIN, "", line])
    with pytest.raises(ChatDataError, match=f"bad.jsonl:3: .*{match}"):
        read_conversations(path)


def test_conversation_without_assistant_is_refused(tmp_path, tok):
    path = fx.write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ChatDataError, match=r"d.jsonl:1: no assistant message"):
        load_examples(path, tok)
    with pytest.raises(ChatDataError, match="no such file"):
        read_conversations(tmp_path / "missing.jsonl")


def test_prompt_and_continuation_check_their_ends(tok):
    with pytest.raises(ChatDataError, match="must end with a user or tool message"):
        encode_prompt(tok, fx.PLAIN["messages"][:3])
    with pytest.raises(ChatDataError, match="must end with an assistant turn|must end with one"):
        encode_continuation(tok, fx.PLAIN["messages"][:2], [{"role": "user", "content": "x"}])
