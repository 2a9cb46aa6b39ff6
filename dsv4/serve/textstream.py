"""Text as a reply streams in: stop strings cut it, and a chat reply splits into reasoning, content and tool calls.

Both work on text pieces of any size and give the same result however the text is split, so a streamed
reply concatenates to exactly the non-streamed one (the server builds the non-streamed reply with them too).
Neither imports torch.
"""
from __future__ import annotations

from ..generate.chat import EOS, THINK_END, parse_completion

_CALLS_LEAD = "\n\n<｜DSML｜tool_calls"   # how a V4 completion announces tool calls (as in parse_completion)


def _held(text: str, markers: list[str]) -> int:
    """Length of the longest suffix of `text` that a marker could start with (held back until more text comes)."""
    for k in range(min(len(text), max((len(m) for m in markers), default=1) - 1), 0, -1):
        tail = text[-k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return 0


class StopCutter:
    """Releases text up to the first stop string; never a part of one. `stopped` turns True when one is seen."""

    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        self.stops = [s for s in stops if s]
        self.stopped = False
        self._held = ""

    def push(self, text: str) -> str:
        """The text that is now known to precede any stop string."""
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        buf = self._held + text
        hits = [p for s in self.stops if (p := buf.find(s)) >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return buf[:min(hits)]
        keep = _held(buf, self.stops)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """At the end of the stream: the held text (it did not turn into a stop string)."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out


class ReplyParser:
    """Splits a V4 chat completion (the text after the assistant opener) into reasoning and content deltas,
    and tool calls at the end.

    Markup is never released as content: text that may begin a tool-call block or `</think>` is held until it
    is known not to. In thinking mode the reasoning ends at `</think>`, or at a tool-call block when the model
    skipped `</think>` (the calls are still parsed, not left inside the reasoning). A tool-call block is kept
    whole and parsed with `parse_completion` at the end; one that does not parse is given back as content.
    """

    def __init__(self, thinking: bool):
        self.state = "reasoning" if thinking else "content"
        self._buf = ""
        self._calls = ""

    def _markers(self) -> list[str]:
        return [THINK_END, _CALLS_LEAD, EOS] if self.state == "reasoning" else [_CALLS_LEAD, EOS]

    def push(self, text: str) -> list[tuple[str, str]]:
        """Deltas as (field, text) with field "reasoning_content" or "content"."""
        out: list[tuple[str, str]] = []
        self._buf += text
        while self._buf:
            if self.state == "done":
                self._buf = ""
            elif self.state == "tools":
                self._calls += self._buf
                self._buf = ""
                if EOS in self._calls:
                    self._calls = self._calls[:self._calls.index(EOS)]
                    self.state = "done"
            else:
                field = "reasoning_content" if self.state == "reasoning" else "content"
                hits = [(p, m) for m in self._markers() if (p := self._buf.find(m)) >= 0]
                if not hits:
                    keep = _held(self._buf, self._markers())
                    self._emit(out, field, self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                p, mark = min(hits)
                self._emit(out, field, self._buf[:p])
                self._buf = self._buf[p + len(mark):]
                if mark == THINK_END:
                    self.state = "content"
                elif mark == _CALLS_LEAD:
                    self.state, self._calls = "tools", _CALLS_LEAD
                else:
                    self.state = "done"
        return out

    @staticmethod
    def _emit(out: list[tuple[str, str]], field: str, text: str) -> None:
        if text:
            out.append((field, text))

    def finish(self) -> tuple[list[tuple[str, str]], list[dict]]:
        """At the end of the stream: the last deltas and the tool calls (OpenAI shape, without ids)."""
        out: list[tuple[str, str]] = []
        if self.state in ("reasoning", "content"):
            self._emit(out, "reasoning_content" if self.state == "reasoning" else "content", self._buf)
        self._buf = ""
        calls: list[dict] = []
        if self._calls:
            try:
                calls = parse_completion(self._calls, thinking=False)["tool_calls"]
            except ValueError:
                calls = []
            if not calls:   # malformed or empty: the text is all the client can be given
                self._emit(out, "content", self._calls)
            self._calls = ""
        self.state = "done"
        return out, calls
