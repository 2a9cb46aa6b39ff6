"""metrics.jsonl: one JSON object per logged step (and per evaluation), appended as the run goes. A resumed
run first cuts the file back to its checkpoint's step, so the file reads as one uninterrupted run."""
from __future__ import annotations

import json
import logging
import os

__all__ = ["MetricsLog", "read_metrics"]

log = logging.getLogger(__name__)


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl ([] if there is none). A malformed last line (the run was killed while
    appending it) is dropped with a warning; a malformed line before it is an error naming the line."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as e:
            if i == len(lines) - 1:
                log.warning("%s line %d: an unfinished last row (the run stopped while writing it), dropped", path, n)
                break
            raise ValueError(f"{path} line {n}: not a metrics row ({e})") from None
        rows.append(row)
    return rows


class MetricsLog:
    """The rows of this run, kept in memory (`rows`) and, where `write` (the main rank), in `path`."""

    def __init__(self, path: str, *, write: bool = True):
        self.path, self.write = path, write
        self.rows: list[dict] = []

    def start(self, step: int = 0) -> None:
        """Keep the rows up to `step` (a resumed run's checkpoint; 0: a fresh run keeps none) and rewrite the file
        with them."""
        if not self.write:
            return
        self.rows = [r for r in read_metrics(self.path) if r["step"] <= step] if step else []
        self._dump(self.rows, "w")

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.write:
            self._dump([row], "a")

    def _dump(self, rows: list[dict], mode: str) -> None:
        with open(self.path, mode) as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
