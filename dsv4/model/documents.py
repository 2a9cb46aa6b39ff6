"""Documents packed back to back into the rows of a batch, kept apart in attention.

Attention is the only part of the model that mixes positions (MoE, mHC and the norms act per token), so a
packed row needs no other change: each block's attention runs on every document alone, from position 0, and
everything else runs on the whole batch as it is. Documents are batched by length for that: those whose
lengths round up to the same size (four sizes per octave) run as one attention batch, padded at their end by
repeats of their last token. Attention is causal, so the padding changes nothing before it (its outputs are dropped).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import InvalidArgument

__all__ = ["PackedDocuments", "padded_length"]


class PackedDocuments:
    """Row b of a [B, S] batch holds documents of lengths `lengths[b]`, in order, covering the row (padding
    after the last one counts as a document of its own)."""

    def __init__(self, lengths: Sequence[Sequence[int]], seq_len: int, device: torch.device | str | None = None):
        for b, row in enumerate(lengths):
            if any(int(n) < 1 for n in row) or sum(row) != seq_len:
                raise InvalidArgument(f"documents of row {b} have lengths {list(row)}: each must be >= 1 and "
                                      f"together they must cover the row's {seq_len} positions")
        self.lengths = [[int(n) for n in row] for row in lengths]
        self.seq_len = seq_len
        self._rows = len(self.lengths)
        spans: dict[int, list[tuple[int, int]]] = {}   # padded length -> (flat start, length) of its documents
        for b, row in enumerate(self.lengths):
            start = b * seq_len
            for n in row:
                spans.setdefault(padded_length(n), []).append((start, n))
                start += n
        # whole groups at a time, not document by document: a packed pre-training batch holds ~1,500 documents
        gathers, source = [], torch.empty(len(self.lengths) * seq_len, dtype=torch.long)
        offset = 0
        for padded, docs in sorted(spans.items()):
            starts, ns = torch.tensor(docs, dtype=torch.long).unbind(1)
            gathers.append(starts[:, None] + torch.minimum(torch.arange(padded)[None, :], ns[:, None] - 1))
            doc = torch.repeat_interleave(torch.arange(len(docs)), ns)              # each position's document
            within = torch.arange(int(ns.sum())) - torch.repeat_interleave(ns.cumsum(0) - ns, ns)
            source[starts[doc] + within] = offset + doc * padded + within
            offset += len(docs) * padded
        self._gathers = [g.to(device) for g in gathers]
        self._source = source.to(device)

    def to(self, device: torch.device | str | None) -> "PackedDocuments":
        """The same layout with its index tensors on `device`."""
        out = object.__new__(PackedDocuments)
        out.lengths, out.seq_len, out._rows = self.lengths, self.seq_len, self._rows
        out._gathers = [g.to(device) for g in self._gathers]
        out._source = self._source.to(device)
        return out

    @classmethod
    def from_indices(cls, gathers: Sequence[torch.Tensor], source: torch.Tensor, rows: int, seq_len: int
                     ) -> "PackedDocuments":
        """A layout given by its index tensors, as `__init__` would build them: per attention batch [N, L] flat
        positions of the rows (each document from its start, padded by repeats of its last position), and per
        flat position its place in the batches' joined outputs. Why: a CUDA graph replays fixed index tensors,
        so a captured step takes its layout as tensors whose shapes do not change from batch to batch
        (dsv4.posttrain.doc_slots). `lengths` is None: the documents are known to the caller only."""
        out = object.__new__(cls)
        out.lengths, out.seq_len, out._rows = None, seq_len, rows
        out._gathers, out._source = list(gathers), source
        return out

    @property
    def shape(self) -> tuple[int, int]:
        return self._rows, self.seq_len

    def check(self, tokens: torch.Tensor) -> None:
        if tuple(tokens.shape) != self.shape:
            raise InvalidArgument(f"packed documents describe a {list(self.shape)} batch, the tokens are "
                                  f"{list(tokens.shape)}")

    def per_document(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """fn applied to each document alone: x [B, S, ...] -> fn's outputs put back in place, [B, S, ...].
        fn maps [N, L, ...] (N documents of L positions from 0) to [N, L, ...] and must be causal."""
        B, S = x.shape[:2]
        flat = x.flatten(0, 1)
        gathers = [g if g.device == x.device else g.to(x.device) for g in self._gathers]
        outs = [fn(flat[g]) for g in gathers]
        joined = torch.cat([o.flatten(0, 1) for o in outs]) if len(outs) > 1 else outs[0].flatten(0, 1)
        source = self._source if self._source.device == x.device else self._source.to(x.device)
        return joined[source].unflatten(0, (B, S))


def padded_length(n: int) -> int:
    """n rounded up to one of four lengths per octave (2^k, 1.25 * 2^k, 1.5 * 2^k, 1.75 * 2^k): at most a quarter
    of a batch's attention is padding, and documents of similar lengths share a batch."""
    step = 1 << max((n - 1).bit_length() - 3, 0)
    return -(-n // step) * step
