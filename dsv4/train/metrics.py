"""metrics.jsonl: one JSON object per logged step (and per evaluation), appended as the run goes. A resumed
run first cuts the file back to its checkpoint's step, so the file reads as one uninterrupted run."""
from __future__ import annotations

import json
import os

__all__ = ["MetricsLog", "read_metrics"]


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl ([] if there is none)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
