"""What a compressor carries across chunk boundaries, and what it hands the cache
(docs/architecture.md#compressor, #kv-cache).

The compressors (dsv4.model.compressor) update a `CompressorState` in place and return `Compressed` entries;
the cache (dsv4.cache.kv_cache) allocates the states and stores the entries. Both sides import these types
from here, below either of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompressorState:
    """fp32 buffers [B, coff*m, coff*Dc] in the reference layout: with overlap, rows 0..m-1 hold the previous
    complete group and rows m..2m-1 the unfinished one; without, rows 0..m-1 hold the unfinished group.
    Scores already include `ape`; empty rows have kv 0 and score -inf (so a fresh state means "position 0")."""
    kv: torch.Tensor
    score: torch.Tensor

    @classmethod
    def empty(cls, batch: int, ratio: int, width: int, overlap: bool, device=None) -> "CompressorState":
        rows = ratio * (2 if overlap else 1)
        return cls(torch.zeros(batch, rows, width, device=device),
                   torch.full((batch, rows, width), float("-inf"), device=device))

    def reset(self) -> None:
        self.kv.zero_()
        self.score.fill_(float("-inf"))

    def select(self, rows: slice) -> "CompressorState":
        return CompressorState(self.kv[rows], self.score[rows])


@dataclass
class Compressed:
    """Entries a chunk completed: entries[b, g] is group first_group[b] + g, real where valid[b, g]."""
    entries: torch.Tensor       # [B, n, Dc]
    first_group: torch.Tensor   # [B] int64
    valid: torch.Tensor | None  # [B, n] bool; None means all valid
