"""DeepSeek-V4 chat format: OpenAI-style messages -> prompt text, completion text -> message.

Matches DeepSeek's reference `encoding/encoding_dsv4.py` (MIT) byte for byte; only the wire-format
strings are taken from it. Input is validated up front: bad roles/tasks raise ValueError even where
the reference would silently skip the message. Rules the model was trained with:
  * no tool turn: tool results join the preceding user turn as <tool_result> blocks, ordered like
    the calls of the latest assistant turn that made calls;
  * in thinking mode, reasoning is shown only after the last user turn unless `drop_thinking=False`
    or a message carries `tools`; developer turns before the last user turn are dropped then;
  * a turn followed by another non-assistant turn gets no `<｜Assistant｜>` opener.
"""
from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["encode_chat", "encode_chat_turns", "parse_completion", "BOS", "EOS", "USER", "ASSISTANT", "LATEST_REMINDER",
           "THINK_START", "THINK_END", "DSML", "TASK_TOKENS", "ROLES", "REASONING_EFFORTS"]

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT, LATEST_REMINDER = "<｜User｜>", "<｜Assistant｜>", "<｜latest_reminder｜>"
THINK_START, THINK_END = "<think>", "</think>"
DSML = "｜DSML｜"   # prefix of the tool-call markup tags
TASK_TOKENS = {t: f"<｜{t}｜>" for t in ("action", "query", "authority", "domain", "title", "read_url")}
ROLES = ("system", "user", "developer", "assistant", "tool", "latest_reminder")
REASONING_EFFORTS = (None, "high", "max")   # only "max" changes the prompt (thinking mode only)

_CALLS_OPEN, _CALLS_CLOSE = f"<{DSML}tool_calls>", f"</{DSML}tool_calls>"
_CALLS_LEAD = f"\n\n<{DSML}tool_calls"          # how a completion announces tool calls
_INVOKE_OPEN, _INVOKE_CLOSE = f"<{DSML}invoke", f"</{DSML}invoke"
_PARAM_OPEN, _PARAM_CLOSE_TAIL = f"<{DSML}parameter", f"/{DSML}parameter"

_MAX_EFFORT = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n")
_RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
_TOOLS = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _check(messages: list[dict], thinking: bool, reasoning_effort: str | None) -> None:
    """Reject bad options and messages before encoding, naming what is wrong."""
    if not isinstance(thinking, bool):
        raise ValueError(f"thinking must be True or False, got {thinking!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {ROLES}")
        if m.get("task") is not None and m["task"] not in TASK_TOKENS:
            raise ValueError(f"message {i}: unknown task {m['task']!r}; expected one of {list(TASK_TOKENS)}")
        if role == "developer" and not m.get("content"):
            raise ValueError(f"message {i}: a developer message needs non-empty content")


def _fold_tool_turns(messages: list[dict]) -> list[dict]:
    """Tool results, and consecutive user texts, pile into one user turn (V4 has no tool role).

    User turns become {"role": "user", "blocks": [(is_tool_result, call_id, text)], "task": ...}; a
    user text opens a new turn unless the previous turn is a user turn without a task. Other keys of
    user messages (tools, response_format) are ignored, as in the reference.
    """
    out: list[dict] = []
    for m in messages:
        prev = out[-1] if out else {}
        if m["role"] == "tool":
            c = m.get("content", "")
            if isinstance(c, list):   # content parts: only text is representable
                c = "\n\n".join(p.get("text", "") if p.get("type") == "text" else f"[Unsupported {p.get('type')}]"
                                for p in c)
            block = (True, m.get("tool_call_id", ""), f"<tool_result>{c}</tool_result>")
            opens, task = prev.get("role") != "user", None
        elif m["role"] == "user":
            block = (False, None, f"{m.get('content') or ''}")
            opens, task = prev.get("role") != "user" or prev["task"] is not None, m.get("task")
        else:
            out.append(m)
            continue
        if opens:
            out.append({"role": "user", "blocks": [block], "task": task})
        else:
            prev["blocks"].append(block)
    return out


def _order_tool_results(turns: list[dict]) -> list[dict]:
    """Order a turn's tool results like the latest assistant tool calls (unknown ids rank as the first)."""
    rank: dict[Any, int] = {}
    out = []
    for t in turns:
        if t["role"] == "assistant" and t.get("tool_calls"):
            ids = [c.get("id") or c.get("function", {}).get("id", "") for c in t["tool_calls"]]
            rank = {cid: i for i, cid in enumerate(ids) if cid}
        elif t["role"] == "user" and rank and sum(b[0] for b in t["blocks"]) > 1:
            results = iter(sorted((b for b in t["blocks"] if b[0]), key=lambda b: rank.get(b[1], 0)))
            t = {**t, "blocks": [next(results) if b[0] else b for b in t["blocks"]]}
        out.append(t)
    return out


def _last_user(turns: list[dict]) -> int:
    return max((i for i, t in enumerate(turns) if t["role"] in ("user", "developer")), default=-1)


def _forget_history(turns: list[dict]) -> list[dict]:
    """Before the last user/developer turn: strip assistant reasoning and drop developer turns."""
    last = _last_user(turns)
    return [{k: v for k, v in t.items() if k != "reasoning_content"} if t["role"] == "assistant" and i < last
            else t for i, t in enumerate(turns) if not (t["role"] == "developer" and i < last)]


def _extras(m: dict) -> str:
    """Tool schemas and the reply schema a system/developer turn can carry."""
    schemas = "\n".join(_json(t["function"]) for t in m.get("tools") or ())
    tools = "\n\n" + _TOOLS.replace("{schemas}", schemas) if m.get("tools") else ""
    return tools + ("\n\n" + _RESPONSE_FORMAT + _json(m["response_format"]) if m.get("response_format") else "")


def _dsml_arguments(arguments: Any) -> str:
    try:
        args = json.loads(arguments)
    except (TypeError, ValueError):   # not a JSON string: pass it through as one parameter
        args = {"arguments": arguments}
    if not isinstance(args, dict):
        raise ValueError(f"tool call arguments must encode a JSON object, got {arguments!r}")
    return "\n".join(f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
                     f'{v if isinstance(v, str) else _json(v)}</{DSML}parameter>' for k, v in args.items())


def _dsml_calls(calls: list[dict] | None) -> str:
    invokes = "\n".join(f'{_INVOKE_OPEN} name="{c["function"]["name"]}">\n'
                        f'{_dsml_arguments(c["function"]["arguments"])}\n{_INVOKE_CLOSE}>' for c in calls or ())
    return f"\n\n{_CALLS_OPEN}\n{invokes}\n{_CALLS_CLOSE}" if calls else ""


def _render(i: int, turns: list[dict], last_user: int, thinking: bool, keep_reasoning: bool,
            effort: str | None) -> str:
    t, role = turns[i], turns[i]["role"]
    # reasoning is part of the context for turns after the last user turn (or everywhere if kept)
    live = thinking and (keep_reasoning or i >= last_user)
    out = _MAX_EFFORT if i == 0 and thinking and effort == "max" else ""
    if role == "system":
        out += f"{t.get('content') or ''}" + _extras(t)
    elif role == "developer":
        out += USER + t["content"] + _extras(t)
    elif role == "user":
        out += USER + "\n\n".join(text for _, _, text in t["blocks"])
    elif role == "latest_reminder":
        out += LATEST_REMINDER + f"{t.get('content')}"
    else:   # assistant; the answer to a task never carries reasoning
        if live and not (i > 0 and turns[i - 1].get("task") is not None):
            out += (t.get("reasoning_content") or "") + THINK_END
        out += f"{t.get('content') or ''}" + _dsml_calls(t.get("tool_calls")) + ("" if t.get("wo_eos") else EOS)
    if i + 1 < len(turns) and turns[i + 1]["role"] not in ("assistant", "latest_reminder"):
        return out   # the next turn is not a reply to this one
    task = t.get("task")
    if task == "action":
        out += ASSISTANT + (THINK_START if thinking else THINK_END) + TASK_TOKENS[task]
    elif task is not None:
        out += TASK_TOKENS[task]
    elif role in ("user", "developer"):
        out += ASSISTANT + (THINK_START if live else THINK_END)
    return out


def encode_chat(messages: list[dict], thinking: bool = False, *, context: list[dict] | None = None,
                drop_thinking: bool = True, add_bos: bool = True, reasoning_effort: str | None = None) -> str:
    """Prompt text for `messages` (OpenAI format plus V4 extras: developer/latest_reminder roles,
    `task`, `wo_eos`, `response_format`, `reasoning_content`).

    `context`: earlier messages already in the prompt; they shape the rendering of `messages` but are
    not emitted (nor is BOS). If `messages` ends with a user turn the text ends with the assistant
    opener (`<｜Assistant｜><think>` or `<｜Assistant｜></think>`), ready for generation.
    """
    return "".join(text for _, text in encode_chat_turns(messages, thinking, context=context,
                                                         drop_thinking=drop_thinking, add_bos=add_bos,
                                                         reasoning_effort=reasoning_effort))


def encode_chat_turns(messages: list[dict], thinking: bool = False, *, context: list[dict] | None = None,
                      drop_thinking: bool = True, add_bos: bool = True,
                      reasoning_effort: str | None = None) -> list[tuple[str, str]]:
    """encode_chat's text cut at the turns it renders: [(role, text)], joined they are encode_chat's text.
    The role is "bos" for BOS, else the turn's (tool results render inside "user" turns). A rendered turn
    carries what the template adds after it (an assistant opener after a user turn)."""
    context = context or []
    _check([*context, *messages], thinking, reasoning_effort)
    past, new = _fold_tool_turns(context), _fold_tool_turns(messages)
    turns = _order_tool_results(past + new)
    keep_reasoning = not drop_thinking or any(t.get("tools") for t in turns)
    start = len(past)
    if thinking and not keep_reasoning:
        # the reference measures the context after forgetting it on its own; kept for parity
        turns, start = _forget_history(turns), len(_forget_history(past))
    prefix = [("bos", BOS)] if add_bos and not past else []
    last_user = _last_user(turns)
    return prefix + [(turns[i]["role"], _render(i, turns, last_user, thinking, keep_reasoning, reasoning_effort))
                     for i in range(start, len(turns))]


class _Cursor:
    """Walks a completion, jumping to the earliest of several markers."""

    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def skip_to(self, *markers: str) -> tuple[str, str | None]:
        """Consume through the earliest marker; return (text before it, marker), or (rest, None)."""
        hits = [(p, k) for k, m in enumerate(markers) if (p := self.text.find(m, self.pos)) >= 0]
        end, k = min(hits, default=(len(self.text), -1))
        chunk, mark = self.text[self.pos:end], markers[k] if hits else None
        self.pos = end + len(mark or "")
        return chunk, mark


def _parse_invokes(cur: _Cursor) -> list[dict]:
    """Invokes after the tool-calls opener, until its closing tag (or the end of the text)."""
    calls = []
    while cur.pos < len(cur.text):
        gap, mark = cur.skip_to(_INVOKE_OPEN, _CALLS_CLOSE)
        if gap != ">\n" or mark is None:
            raise ValueError(f"malformed tool calls: expected '>\\n' and a tag, got {gap!r}")
        if mark == _CALLS_CLOSE:
            break
        head, mark = cur.skip_to(_PARAM_OPEN, _INVOKE_CLOSE)
        name = re.match(r'\s*name="(.*?)">\n$', head, flags=re.DOTALL)
        if name is None:
            raise ValueError(f"malformed tool call name: {head!r}")
        params: dict[str, str] = {}
        while mark == _PARAM_OPEN:
            body, _ = cur.skip_to(_PARAM_CLOSE_TAIL)
            p = re.match(r' name="(.*?)" string="(true|false)">(.*?)<$', body, flags=re.DOTALL)
            if p is None:
                raise ValueError(f"malformed tool call parameter: {body!r}")
            key, is_str, value = p.groups()
            if key in params:
                raise ValueError(f"tool call repeats parameter {key!r}")
            params[key] = _json(value) if is_str == "true" else value   # non-strings are JSON already
            gap, mark = cur.skip_to(_PARAM_OPEN, _INVOKE_CLOSE)
            if gap != ">\n":
                raise ValueError(f"malformed tool call parameter end: expected '>\\n', got {gap!r}")
        arguments = "{" + ", ".join(f"{_json(k)}: {v}" for k, v in params.items()) + "}"
        calls.append({"type": "function", "function": {"name": name.group(1), "arguments": arguments}})
    return calls


def parse_completion(text: str, thinking: bool = False) -> dict:
    """The assistant message a completion encodes (text generated after the assistant opener,
    through EOS): {"role", "content", "reasoning_content", "tool_calls" (OpenAI format)}.

    Raises ValueError when the text does not follow the format. As in the reference, values marked
    string="false" go into the arguments JSON unchecked, and a tool-call block cut short (no closing
    tags, no EOS) still parses.
    """
    if not isinstance(thinking, bool):
        raise ValueError(f"thinking must be True or False, got {thinking!r}")
    cur, reasoning, calls = _Cursor(text), "", []
    if thinking:
        reasoning, mark = cur.skip_to(THINK_END, _CALLS_LEAD)
        if mark != THINK_END:
            raise ValueError(f"completion has no {THINK_END} closing the reasoning")
    content, mark = cur.skip_to(EOS, _CALLS_LEAD)
    if mark == _CALLS_LEAD:
        calls = _parse_invokes(cur)
        trailing, _ = cur.skip_to(EOS)
        if trailing:
            raise ValueError(f"text after the tool calls: {trailing!r}")
    elif mark is None:
        raise ValueError("completion does not end with EOS")
    if cur.pos < len(text):
        raise ValueError(f"text after EOS: {text[cur.pos:]!r}")
    for token in (BOS, EOS, THINK_START, THINK_END, DSML):
        if token in content or token in reasoning:
            raise ValueError(f"special token {token!r} inside the content or reasoning")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": calls}
