"""Streaming detokenisation: text as tokens arrive, never cutting a multi-byte character in two."""
from __future__ import annotations

from typing import Iterable

from .tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Turns a growing token sequence into text pieces whose concatenation (after `flush`) is
    `tok.decode(all tokens)`.

    A byte-level BPE token can end inside a UTF-8 character; decoding then ends in U+FFFD until the tokens that
    finish the character arrive, so a piece is released only when the decoded text does not end in U+FFFD.
    Each step decodes only the window since the last released piece, plus that piece's tokens as context (a
    decoder may treat a sequence's first token specially, e.g. strip its leading space): the window starts and
    ends on character boundaries, so its new text is exactly what decoding everything would add. A step costs
    O(tokens since the previous piece), not O(all tokens).
    """

    def __init__(self, tok: Tokenizer, skip_special: bool = False):
        self.tok, self.skip_special = tok, skip_special
        self.ids: list[int] = []
        self._context = 0   # start of the last released piece's tokens (decoded as context only)
        self._released = 0  # end of the released tokens: everything before it has been returned as text
        # ids at or past it have no token and decode to nothing: they are left out, so a stream of them (a
        # random model's ids past a small tokenizer) does not grow the window every later step decodes
        self._limit: int | None = getattr(tok, "id_limit", None)

    def _window(self) -> tuple[str, str]:
        """(text of the last released piece's tokens, text of those tokens and every later one)."""
        def decode(ids: list[int]) -> str:
            return self.tok.decode(ids, skip_special=self.skip_special)
        return decode(self.ids[self._context:self._released]), decode(self.ids[self._context:])

    def push(self, ids: int | Iterable[int]) -> str:
        """Add one token id (or several); returns the text they complete ('' while a character is unfinished)."""
        new = [ids] if isinstance(ids, int) else list(ids)
        if self._limit is not None:
            new = [t for t in new if t < self._limit]
        if not new:
            return ""
        self.ids.extend(new)
        done, text = self._window()
        if len(text) <= len(done) or text.endswith(_REPLACEMENT):
            return ""
        self._context, self._released = self._released, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """The text still held back at the end of the stream (an unfinished character decodes as U+FFFD).
        Call it once, when no more tokens will come."""
        done, text = self._window()
        self._context, self._released = self._released, len(self.ids)
        return text[len(done):]
