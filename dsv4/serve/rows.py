"""The pool of cache rows the engine hands out: which row each request holds, and in which phase it is.

Kept apart from the engine so the rule that decides which rows a decode step may touch is one small function
with its own tests: a decode forward advances every row of its cache view, so a view may cover decoding rows
and free rows (fed a dummy token; a free row is reset before it is handed out), never a row still prefilling.
"""
from __future__ import annotations

from enum import Enum

__all__ = ["Phase", "RowPool", "decode_runs", "bucket_for"]


class Phase(Enum):
    FREE = "free"
    PREFILL = "prefill"
    DECODE = "decode"


class RowPool:
    """Rows 0..n-1 of one cache, each free, prefilling or decoding. A request takes the lowest free row, so the
    busy rows stay packed at the bottom and decode views stay short."""

    def __init__(self, n: int):
        self.phase = [Phase.FREE] * n

    def __len__(self) -> int:
        return len(self.phase)

    def take(self) -> int | None:
        """The lowest free row, now prefilling; None when every row is busy."""
        for r, p in enumerate(self.phase):
            if p is Phase.FREE:
                self.phase[r] = Phase.PREFILL
                return r
        return None

    def free(self, row: int) -> None:
        self.phase[row] = Phase.FREE

    def rows(self, phase: Phase) -> list[int]:
        return [r for r, p in enumerate(self.phase) if p is phase]

    @property
    def busy(self) -> int:
        return sum(p is not Phase.FREE for p in self.phase)


def decode_runs(phase: list[Phase]) -> list[range]:
    """The row ranges one batched decode step runs as separate forwards: the rows up to the highest decoding row,
    split at prefilling rows (which a forward must not advance), each trimmed to start and end at a decoding row.
    Free rows inside a range ride along with a dummy token."""
    runs: list[range] = []
    start = None
    for r, p in enumerate(phase + [Phase.PREFILL]):
        if p is Phase.PREFILL:
            if start is not None:
                last = max(i for i in range(start, r) if phase[i] is Phase.DECODE)
                runs.append(range(start, last + 1))
            start = None
        elif p is Phase.DECODE and start is None:
            start = r
    return runs


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest captured batch size that holds rows [0, n), or None."""
    return next((b for b in buckets if b >= n), None)
