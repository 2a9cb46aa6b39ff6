"""Counting the host's reads of tensor values (on a GPU each read of a device tensor waits for the queue): for the
tests that check an update loop reads only where it means to."""
from __future__ import annotations

import sys

import torch

READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


def count_reads(monkeypatch) -> list[tuple[str, str, str]]:
    """Patch Tensor's value reads to record each one's (read, calling function, file); returns the list they
    append to (undone with the monkeypatch)."""
    calls = []
    for name in READS:
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            code = sys._getframe(1).f_code
            calls.append((_name, code.co_name, code.co_filename))
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls
