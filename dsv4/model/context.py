"""The seam for context parallelism: a process that holds only pieces of its sequences (contiguous position
ranges, e.g. chunk r, or chunks r and 2N-1-r of N ranks), while attention must see the whole sequence.

Attention is the only part of the model that mixes positions (mHC, the MoE and the norms act per token), and it
needs two things from elsewhere (docs/v4-architecture.md, the two stages of context parallelism):
  1. the attention-input rows just before each piece: the raw window's last W-1 rows and what a compressor needs
     for the groups the piece completes (the unfinished group across the piece's start and, for the overlapping
     CSA compressor, the group before it). Everything derived from them is computed here, by the same code as
     for the piece's own rows;
  2. every compressed entry (and indexer key) of the whole sequence: each piece compresses the groups it
     completes and the pieces' entries are gathered; queries then mask them by position.

`SequenceContext` names what the model asks for; dsv4.distributed.context_parallel implements it with
collectives (the model itself never communicates). Every call is a collective: every holder of a piece of the
sequences must make the same calls in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

__all__ = ["Piece", "SequenceContext", "LocalPieces"]


@dataclass(frozen=True)
class Piece:
    """Local rows offset .. offset+length-1 hold global positions start .. start+length-1."""
    offset: int
    start: int
    length: int


class SequenceContext(Protocol):
    def begin(self) -> None:
        """A forward pass over new sequences starts (Transformer.hidden calls it)."""

    def begin_layer(self, key: int, repeatable: bool) -> None:
        """Attention layer `key`'s exchanges follow (Attention calls it before them). repeatable: the layer may run
        again in the backward pass (activation checkpointing recomputes it); the repeat must get the same
        exchanges' results without communicating, as ranks do not reach a recompute at matching points of their
        backward passes."""

    def pieces(self, n_local: int) -> list[Piece]:
        """This process's pieces of sequences whose local rows number `n_local`, in local row order."""

    def positions(self, n_local: int, device: torch.device | str | None = None) -> torch.Tensor:
        """[n_local] int64: the global position of each local row."""

    def shard_positions(self, total: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The global positions this process holds of sequences of `total` positions (its forward's rows)."""

    def rows_before(self, x: torch.Tensor, rows: int) -> list[torch.Tensor]:
        """x: [B, n_local, ...] local rows -> per piece, the `rows` rows of the whole sequence just before its
        start ([B, min(rows, start), ...]; fewer at the sequence start). Differentiable."""

    def gather_groups(self, entries: list[torch.Tensor], ratio: int, n_local: int) -> torch.Tensor:
        """Per piece, the entries [B, n_i, D] of the groups of `ratio` positions it completes (those whose last
        position it holds) -> every entry of the whole sequence in group order [B, total // ratio, D].
        Differentiable."""

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over every holder of a piece of these sequences (each gets the sum). Differentiable."""


@dataclass
class LocalPieces:
    """One attention layer's view of its pieces: the context, the pieces and the input rows before each (one
    exchange per layer, shared by the window, the compressor and the indexer's compressor)."""
    context: SequenceContext
    pieces: list[Piece]
    before: list[torch.Tensor]          # per piece [B, P_i, C]: attention-input rows start-P_i .. start-1

    @classmethod
    def exchange(cls, context: SequenceContext, x: torch.Tensor, rows: int) -> "LocalPieces":
        return cls(context, context.pieces(x.shape[1]), context.rows_before(x, rows))

    def detached(self) -> "LocalPieces":
        return replace(self, before=[b.detach() for b in self.before])

    def entries(self, compressor, x: torch.Tensor, freqs: torch.Tensor, quant_sim: bool) -> torch.Tensor:
        """Every entry of `compressor` over the whole sequence [B, total // ratio, D]: each piece compresses the
        groups it completes from its rows and the rows before it, and the pieces' entries are gathered."""
        m, B = compressor.ratio, x.shape[0]
        mine = []
        for p, before in zip(self.pieces, self.before):
            first = p.start // m                # the first group whose last position this piece holds
            if compressor.overlap and first:    # and the group before, whose A-half its first entry pools
                first -= 1
            lead = p.start - first * m          # rows before the piece that the groups cover
            if lead > before.shape[1]:
                raise ValueError(f"a ratio-{m} compressor needs {lead} rows before position {p.start}, the "
                                 f"context gave {before.shape[1]}")
            rows = torch.cat((before[:, before.shape[1] - lead:], x[:, p.offset:p.offset + p.length]), 1)
            pos0 = torch.full((B,), first * m, dtype=torch.long, device=x.device)
            got = compressor(rows, pos0, freqs, quant_sim).entries              # groups first .. end // m - 1
            mine.append(got[:, p.start // m - first:])
        if torch.is_grad_enabled() and not any(e.shape[1] for e in mine):
            # this process completes none of the compressor's groups, and the compressor returns no entry without
            # touching its parameters: they get a zero gradient here, so every process has gradients for the same
            # parameters (a data-parallel reduction such as FSDP2's covers those it has: mismatched sets hang)
            mine[0] = mine[0] + 0.0 * sum(q.sum() for q in compressor.parameters() if q.requires_grad)
        return self.context.gather_groups(mine, m, x.shape[1])
