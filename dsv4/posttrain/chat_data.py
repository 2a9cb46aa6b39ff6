"""Chat data for SFT and rollouts: OpenAI-format conversations -> V4-encoded token ids + an assistant-only mask.

A `.jsonl` line is one conversation: {"messages": [...], "tools"?: [...], "thinking"?: bool}. It is rendered
with the official V4 encoding (dsv4.generate.chat) and tokenised piece by piece: the template's text and each
assistant turn's text separately, so the mask is exact whatever the tokenizer does at their seams. The seams
fall next to V4's special tokens (the assistant opener's <think> or </think>, EOS), which a tokenizer with
those as special tokens never merges across, so the pieces' ids joined equal the whole text's ids.

Prompts for rollouts (`encode_prompt`) and the tool results appended after a sampled assistant turn
(`encode_continuation`) are tokenised the same way, so a rollout's tokens are what SFT would train on.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import DsV4Error
from ..generate.chat import EOS, ROLES, encode_chat_turns

__all__ = ["ChatDataError", "Conversation", "Example", "read_conversations", "encode_conversation",
           "load_examples", "encode_prompt", "encode_continuation", "with_tools"]


class ChatDataError(DsV4Error, ValueError):
    """A conversation that cannot be trained on; the message names its file and line."""


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...   # no BOS added: the rendered text carries its own


@dataclass
class Conversation:
    messages: list[dict]
    thinking: bool | None = None     # None: the caller's default
    where: str = "<conversation>"    # file:line, for errors


@dataclass
class Example:
    """One tokenised conversation: mask[i] = 1 where tokens[i] is the assistant's (trained), 0 elsewhere."""
    tokens: list[int]
    mask: list[int]
    where: str = "<conversation>"


def read_conversations(path: str | os.PathLike) -> list[Conversation]:
    """Every conversation of a `.jsonl` file, checked: bad JSON, fields or roles raise ChatDataError naming
    file:line. Blank lines are skipped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ChatDataError(f"{path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                out.append(_parse_line(line, f"{path}:{n}"))
    if not out:
        raise ChatDataError(f"{path}: no conversations in the file")
    return out


def _parse_line(line: str, where: str) -> Conversation:
    try:
        row = json.loads(line)
    except ValueError as e:
        raise ChatDataError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise ChatDataError(f"{where}: expected a JSON object with 'messages', got {type(row).__name__}")
    unknown = set(row) - {"messages", "tools", "thinking"}
    if unknown:
        raise ChatDataError(f"{where}: unknown field(s) {sorted(unknown)}; expected messages, tools, thinking")
    messages, tools, thinking = row.get("messages"), row.get("tools"), row.get("thinking")
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f"{where}: 'messages' must be a non-empty list")
    if thinking is not None and not isinstance(thinking, bool):
        raise ChatDataError(f"{where}: 'thinking' must be true or false, got {thinking!r}")
    messages = [_message(m, i, where) for i, m in enumerate(messages)]
    if tools is not None:
        messages = _attach_tools(messages, tools, where)
    return Conversation(messages, thinking, where)


def _message(m: Any, i: int, where: str) -> dict:
    """A checked copy of message i: known role, text content, well-formed tool calls (arguments as JSON text)."""
    if not isinstance(m, dict):
        raise ChatDataError(f"{where}: message {i} must be an object, got {type(m).__name__}")
    role = m.get("role")
    if role not in ROLES:
        raise ChatDataError(f"{where}: message {i} has unknown role {role!r}; expected one of {list(ROLES)}")
    m = dict(m)
    for key in ("content", "reasoning_content"):
        if key in m and m[key] is not None:
            m[key] = _text(m[key], f"{where}: message {i} {key}")
    if m.get("tool_calls") is not None:
        if role != "assistant":
            raise ChatDataError(f"{where}: message {i} ({role}) has tool_calls; only assistant messages call tools")
        if not isinstance(m["tool_calls"], list):
            raise ChatDataError(f"{where}: message {i} tool_calls must be a list")
        m["tool_calls"] = [_tool_call(c, f"{where}: message {i} tool call {k}") for k, c in enumerate(m["tool_calls"])]
    return m


def _text(value: Any, what: str) -> str:
    """A string, or OpenAI content parts of type text (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(_is_text_part(p) for p in value):
        return "".join(p["text"] for p in value)
    raise ChatDataError(f"{what} must be a string or a list of text parts, got {json.dumps(value)[:80]}")


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _tool_call(c: Any, what: str) -> dict:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ChatDataError(f"{what}: expected {{'function': {{'name': ..., 'arguments': ...}}}}")
    args = fn.get("arguments", "{}")
    if isinstance(args, dict):
        args = json.dumps(args, ensure_ascii=False)
    try:
        ok = isinstance(args, str) and isinstance(json.loads(args), dict)
    except ValueError:
        ok = False
    if not ok:
        raise ChatDataError(f"{what} ({fn['name']}): arguments must be a JSON object (or its JSON text), got {args!r}")
    return {**c, "type": "function", "function": {**fn, "arguments": args}}


def _attach_tools(messages: list[dict], tools: Any, where: str) -> list[dict]:
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                              and t["function"].get("name") for t in tools):
        raise ChatDataError(f"{where}: 'tools' must be a list of {{'type': 'function', 'function': {{'name', ...}}}}")
    return with_tools(messages, tools)


def with_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The messages with the tool schemas where V4 reads them: on the first system message (one is added
    in front when there is none)."""
    if not tools:
        return messages
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "tools": tools}, *messages[1:]]
    return [{"role": "system", "content": "", "tools": tools}, *messages]


# ------------------------------------------------------------------------------------------ tokenising

def _pieces(turns: list[tuple[str, str]]) -> list[tuple[str, int]]:
    """Rendered turns -> alternating (text, is_assistant) pieces: an assistant turn's text through its EOS is
    the assistant's; what the template adds (openers, BOS, the other roles' turns) is not."""
    out: list[tuple[str, int]] = []

    def add(text: str, trained: int) -> None:
        if not text:
            return
        if out and out[-1][1] == trained:
            out[-1] = (out[-1][0] + text, trained)
        else:
            out.append((text, trained))
    for role, text in turns:
        if role == "assistant":
            end = text.rfind(EOS)
            end = len(text) if end < 0 else end + len(EOS)
            add(text[:end], 1)
            add(text[end:], 0)
        else:
            add(text, 0)
    return out


def _tokenize(tokenizer: TextTokenizer, pieces: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    tokens: list[int] = []
    mask: list[int] = []
    for text, trained in pieces:
        ids = tokenizer.encode(text)
        tokens += ids
        mask += [trained] * len(ids)
    return tokens, mask


def _render(messages: list[dict], thinking: bool, where: str, **kw) -> list[tuple[str, str]]:
    try:
        return encode_chat_turns(messages, thinking, **kw)
    except ValueError as e:
        raise ChatDataError(f"{where}: {e}") from None


def encode_conversation(tokenizer: TextTokenizer, messages: list[dict] | Conversation, thinking: bool = False,
                        *, tools: list[dict] | None = None) -> Example:
    """A whole conversation (with its assistant turns) -> tokens and the assistant-only mask. A Conversation's
    own `thinking` wins over the argument."""
    where = "<conversation>"
    if isinstance(messages, Conversation):
        thinking = thinking if messages.thinking is None else messages.thinking
        messages, where = messages.messages, messages.where
    messages = with_tools(messages, tools)
    if not any(m.get("role") == "assistant" for m in messages):
        raise ChatDataError(f"{where}: no assistant message (nothing to train on)")
    tokens, mask = _tokenize(tokenizer, _pieces(_render(messages, thinking, where)))
    return Example(tokens, mask, where)


def load_examples(path: str | os.PathLike, tokenizer: TextTokenizer, thinking: bool = False) -> list[Example]:
    """read_conversations + encode_conversation for every line (`thinking`: for lines that do not say)."""
    return [encode_conversation(tokenizer, c, thinking) for c in read_conversations(path)]


def encode_prompt(tokenizer: TextTokenizer, messages: list[dict], thinking: bool = False, *,
                  tools: list[dict] | None = None) -> list[int]:
    """Token ids of a prompt ready for generation: messages ending in a user (or tool) turn, rendered with the
    assistant opener at the end. The ids are those SFT gives the same text."""
    messages = with_tools(messages, tools)
    if not messages or messages[-1].get("role") not in ("user", "tool", "developer"):
        last = messages[-1].get("role") if messages else None
        raise ChatDataError(f"a prompt must end with a user or tool message, not {last!r}")
    return _tokenize(tokenizer, _pieces(_render(messages, thinking, "<prompt>")))[0]


def encode_continuation(tokenizer: TextTokenizer, history: list[dict], new_messages: list[dict],
                        thinking: bool = False, *, tools: list[dict] | None = None) -> list[int]:
    """Token ids that follow `history` (which ends with an assistant turn, already tokenised) for
    `new_messages` (tool results, a user turn), ending with the assistant opener of the next turn: what a
    multi-turn rollout appends before sampling again."""
    history = with_tools(history, tools)
    if not history or history[-1].get("role") != "assistant":
        raise ChatDataError("a continuation follows an assistant turn: `history` must end with one")
    if not new_messages or new_messages[-1].get("role") not in ("user", "tool", "developer"):
        raise ChatDataError("a continuation must end with a user or tool message (the next turn is sampled)")
    turns = _render(new_messages, thinking, "<continuation>", context=history, add_bos=False)
    return _tokenize(tokenizer, _pieces(turns))[0]
