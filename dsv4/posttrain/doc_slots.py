"""Packed documents in a fixed set of attention slots, so every packed SFT batch has the same tensor shapes.

Why: packed rows keep their documents apart by running attention on each document alone, batched by length
(dsv4.model.documents). How many documents fall in each length class changes from batch to batch, so the index
tensors' shapes do too, and a CUDA graph (which replays fixed shapes) cannot take them. A plan fixes the
attention batches instead: per slot length L, N slots. A batch's documents go, longest first, to the shortest
free slot at least as long as their own class (fit_plan sizes the plan so that this never fails for the
batches it saw); a slot left empty repeats position 0 (its outputs are read by no
position). A document in a longer slot is padded by repeats of its last position, which causal attention never
reads back, so its outputs are those of its own class. Empty slots do count, with their positions, in the
indexer's KL mean (as the padding of every slot does already).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence

import torch

from ..model.documents import padded_length

__all__ = ["Plan", "row_documents", "fit_plan", "grow_plan", "slot_indices"]

Plan = tuple[tuple[int, int], ...]   # (slot length, number of slots) per attention batch, by length


def row_documents(lengths: Sequence[int], seq_len: int) -> list[int]:
    """A row's documents as attention sees them: its examples, then the padding after them as one more."""
    pad = seq_len - sum(lengths)
    return [*lengths, pad] if pad > 0 else list(lengths)


def fit_plan(batches: Iterable[Sequence[Sequence[int]]], seq_len: int, headroom: float = 0.0) -> Plan:
    """The smallest plan every one of `batches` (each a list of rows' example lengths) fits: a document fits any
    slot at least as long as its class, so a batch fits when, for every length L, its documents of class >= L are
    no more than the slots of length >= L. M(L), the most such documents of any batch, fixes the plan: M(L) - M(L')
    slots of length L (L' the next class up). A single batch's plan is its own layout (one slot per document).
    headroom: M(L) raised by that fraction (rounded up), so that batches beyond these (the next epochs') fit too.
    """
    return _envelope([_classes(rows, seq_len) for rows in batches], headroom)


def grow_plan(plan: Plan, rows: Sequence[Sequence[int]], seq_len: int, headroom: float = 0.0) -> Plan:
    """A plan that `plan`'s batches and this one all fit: fit_plan's envelope of the two (with headroom)."""
    return _envelope([Counter(dict(plan)), _classes(rows, seq_len)], headroom)


def _classes(rows: Sequence[Sequence[int]], seq_len: int) -> Counter[int]:
    return Counter(padded_length(n) for row in rows for n in row_documents(row, seq_len))


def _envelope(counts: Sequence[Counter[int]], headroom: float) -> Plan:
    plan, above = [], 0
    for length in sorted({cls for c in counts for cls in c}, reverse=True):
        most = max(sum(n for cls, n in c.items() if cls >= length) for c in counts)
        most += math.ceil(most * headroom)
        if most > above:
            plan.append((length, most - above))
            above = most
    return tuple(reversed(plan))


def slot_indices(rows: Sequence[Sequence[int]], seq_len: int, plan: Plan
                 ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """PackedDocuments' index tensors (`from_indices`) for rows of example lengths laid out in `plan`'s slots:
    per slot length an [N, L] gather of flat positions and the [rows * seq_len] source of each position; None
    when the documents do not fit the plan. Documents keep their order within a slot length, so a batch laid out
    in its own plan (fit_plan of it alone) gets the indices PackedDocuments builds."""
    docs = []   # (flat start, length)
    for b, row in enumerate(rows):
        start = b * seq_len
        for n in row_documents(row, seq_len):
            docs.append((start, n))
            start += n
    free = [n for _, n in plan]
    placed: list[list[tuple[int, int]]] = [[] for _ in plan]
    for start, n in sorted(docs, key=lambda d: -d[1]):
        need = padded_length(n)
        g = next((i for i, (length, _) in enumerate(plan) if length >= need and free[i]), None)
        if g is None:
            return None
        free[g] -= 1
        placed[g].append((start, n))
    gathers, source = [], torch.empty(len(rows) * seq_len, dtype=torch.long)
    offset = 0
    for (length, slots), group in zip(plan, placed):
        real = len(group)
        starts, ns = torch.tensor(sorted(group) + [(0, 1)] * (slots - real), dtype=torch.long).unbind(1)
        gathers.append(starts[:, None] + torch.minimum(torch.arange(length)[None, :], ns[:, None] - 1))
        doc = torch.repeat_interleave(torch.arange(real), ns[:real])     # each real position's slot
        within = torch.arange(len(doc)) - torch.repeat_interleave(ns[:real].cumsum(0) - ns[:real], ns[:real])
        source[starts[doc] + within] = offset + doc * length + within
        offset += slots * length
    return gathers, source
