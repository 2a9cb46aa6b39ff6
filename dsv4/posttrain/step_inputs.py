"""An SFT batch as one int64 tensor of fixed shape, and back: the input a CUDA graph of the step replays.

Why one tensor: dsv4.train.cuda_graph.GraphedLoss copies each step's input into the one tensor its capture read.
The flat tensor holds, in order: tokens, targets, each MTP depth's inputs and targets (each [B, S]); with packed
documents then the layout's source [B * S] and its gathers (doc_slots plan: [N, L] each). A `Layout` says where.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.documents import PackedDocuments
from .doc_slots import Plan, slot_indices
from .packing import Batch

__all__ = ["Layout", "encode", "decode"]


@dataclass(frozen=True)
class Layout:
    rows: int
    seq_len: int
    n_mtp: int
    plan: Plan | None     # the documents' attention slots; None: one document per row (no layout)

    @property
    def size(self) -> int:
        n = (2 + 2 * self.n_mtp) * self.rows * self.seq_len
        if self.plan is not None:
            n += self.rows * self.seq_len + sum(length * slots for length, slots in self.plan)
        return n


def encode(batch: Batch, plan: Plan | None) -> tuple[Layout, torch.Tensor] | None:
    """The batch as (its layout, a flat int64 tensor); None where its documents do not fit `plan`'s slots
    (doc_slots.grow_plan makes one they fit). plan None: the rows must each hold one document."""
    B, S = batch.tokens.shape
    parts = [batch.tokens, batch.targets, *batch.mtp_inputs, *batch.mtp_targets]
    if plan is None:
        if batch.docs is not None:
            raise ValueError("a batch of packed rows needs a plan of attention slots")
        return Layout(B, S, len(batch.mtp_inputs), None), torch.cat([p.reshape(-1) for p in parts])
    placed = slot_indices(batch.lengths, S, plan)
    if placed is None:
        return None
    gathers, source = placed
    flat = torch.cat([p.reshape(-1) for p in parts] + [source] + [g.reshape(-1) for g in gathers])
    return Layout(B, S, len(batch.mtp_inputs), plan), flat


def decode(flat: torch.Tensor, layout: Layout) -> Batch:
    """The Batch `encode` flattened, as views of `flat` (on its device). Its `lengths` are not kept."""
    B, S, k = layout.rows, layout.seq_len, layout.n_mtp
    rows = flat[:(2 + 2 * k) * B * S].view(2 + 2 * k, B, S)
    docs = None
    if layout.plan is not None:
        at = (2 + 2 * k) * B * S
        source = flat[at:at + B * S]
        at += B * S
        gathers = []
        for length, slots in layout.plan:
            gathers.append(flat[at:at + length * slots].view(slots, length))
            at += length * slots
        docs = PackedDocuments.from_indices(gathers, source, B, S)
    return Batch(rows[0], rows[1], list(rows[2:2 + k]), list(rows[2 + k:]), docs)
