"""Exact rollback of a cached step (speculative decoding's verify): snapshot, before a step of S tokens, only what
that step can overwrite and a later step can read, and afterwards put back what the rejected tokens wrote.

A step of S tokens on a row at position p writes (docs/architecture.md#kv-cache):
  * the window ring's slots (p + i) % W, i < S, which held positions p + i - W (still needed when the tokens
    after p + keep are rejected): snapshot before, put back after;
  * compressed-entry and indexer-key rows of the groups completed at positions p .. p+S-1. A rejected token only
    completes groups g >= (p + keep) // m, rows no read sees (every read masks entries by position, as it masks
    the rows a reset leaves from an earlier sequence) and the step that completes group g writes again. So they
    are left as they are: the rows below (p + keep) // m, the only ones a later step reads, are the keep-token
    step's;
  * the compressor states (unfinished group, and for CSA the previous group), which a completed group shifts:
    snapshot whole (at most 2m rows), together with the step's own token rows, which the compressors journal
    while the checkpoint is open. A rollback rebuilds the state a step of only the first keep[b] token rows would
    have left, as one gather from (old state, token rows, an empty row) (absorb only moves values, so it is bit
    for bit); keeping every token re-makes the step's own state.
Rows may keep different counts. The rings and the states of every layer live in a few stacked tensors
(dsv4.cache.stacks), so a checkpoint is one gather or clone per stack and a rollback a few ops per stack, whatever
the number of layers.

Both run on device data alone (the rows' start positions and kept counts as tensors), with fixed shapes: no host
value is read, so a CUDA graph can capture them. The state's gather index comes from a table over (start % m,
kept count), built once per ratio, layout and step length (`state_table`) and looked up with one index op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .stacks import Stack
from .state import absorbed, absorbed_table
from .step_memo import constant


@dataclass
class StackCheckpoint:
    positions: torch.Tensor             # [B, S] the step's positions p .. p+S-1
    slots: torch.Tensor                 # [B, S] their ring slots
    steps: torch.Tensor                 # [S] 0 .. S-1
    rings: list[torch.Tensor]           # per ring stack: those slots' old contents [L, B, S, record]
    states: list[torch.Tensor]          # per state stack: the old states [L, 2, B, R, width]


def checkpoint(rings: list[Stack], states: list[Stack], layers: list, starts: torch.Tensor, n_tokens: int,
               window: int, tables: dict) -> StackCheckpoint:
    """Snapshot what a step of n_tokens at positions starts[b].. ([B] on the device) can overwrite that a later
    step reads, and open the compressors' journals. Device work only, the same whatever the positions (the
    rollback's tables and the step numbers, built here on first use, are the exception: constants, made before any
    capture)."""
    for s in states:
        state_table(tables, s.ratio, s.overlap, n_tokens, starts.device)
    empty_row(tables, starts.device)
    steps = step_numbers(tables, n_tokens, starts.device)
    positions = starts[:, None] + steps
    slots = positions % window
    old_rings = [r.t.gather(2, _ring_index(slots, r.t)) for r in rings]
    old_states = [s.t.clone() for s in states]
    for layer in layers:
        for st in layer.states():
            st.journal = []
    return StackCheckpoint(positions, slots, steps, old_rings, old_states)


def rollback(rings: list[Stack], states: list[Stack], layers: list, ckpt: StackCheckpoint, starts: torch.Tensor,
             keep: torch.Tensor, n_tokens: int, tables: dict, counts: set[int] | None = None) -> None:
    """Undo what tokens keep[b] .. n_tokens-1 of the checkpointed step(s) wrote (starts, keep: [B] on the device),
    all rows and layers at once. `counts`, the keep values when the host knows them, skips the work when every row
    keeps every token; without it the work is the same whatever the counts (a CUDA graph can replay it).
    `tables` memoises `state_table` (with the empty-row constant) across rollbacks."""
    journals = [[st.journal for st in s.states(layers)] for s in states]
    for layer in layers:
        for st in layer.states():
            st.journal = None
    if counts is not None and counts <= {n_tokens}:
        return
    rejected = (ckpt.steps >= keep[:, None])[None, :, :, None]                   # [1, B, S, 1]
    for r, old in zip(rings, ckpt.rings):
        index = _ring_index(ckpt.slots, r.t)
        r.t.scatter_(2, index, torch.where(rejected, old, r.t.gather(2, index)))
    phases: dict = {}
    lookups: dict = {}
    for s, old, js in zip(states, ckpt.states, journals):
        if not any(js):
            continue
        rows = [_joined(j) for j in js]                                  # per member (kv, score, ape) [B, S', w]
        L, _, B, _, w = s.t.shape
        m, S = s.ratio, rows[0][0].shape[1]
        if (m, S) not in phases:                                          # [B, S'] each token row's phase
            phases[m, S] = ckpt.positions[:, :S] % m
        phase = phases[m, S]
        tok = torch.stack([x for kv, score, _ in rows for x in (kv, score)]).view(L, 2, B, S, w)
        tok[:, 1].add_(torch.stack([ape.float() for _, _, ape in rows])[:, phase])   # the scores' position bias
        key = (m, s.overlap, S)
        if key not in lookups:
            lookups[key] = state_table(tables, m, s.overlap, S, starts.device)[phase[:, 0], keep]
        absorbed(old, tok, lookups[key], empty_row(tables, s.t.device), out=s.t)


def state_table(tables: dict, ratio: int, overlap: bool, n_tokens: int, device) -> torch.Tensor:
    """`absorbed_table`, memoised in `tables` per (ratio, layout, n_tokens, device): built on first use (the
    checkpoint's; an eager call comes before any capture)."""
    key = (ratio, overlap, n_tokens, str(device))
    if key not in tables:
        tables[key] = absorbed_table(ratio, overlap, n_tokens, device)
    return tables[key]


def step_numbers(tables: dict, n_tokens: int, device) -> torch.Tensor:
    """[n_tokens] long 0 .. n_tokens-1 (read-only; memoised in `tables`)."""
    return constant(tables, ("steps", n_tokens, str(device)), lambda: torch.arange(n_tokens, device=device))


def empty_row(tables: dict, device) -> torch.Tensor:
    """[1, 2, 1, 1, 1] fp32 (kv 0, score -inf): an empty state row (memoised in `tables`)."""
    key = ("empty", str(device))
    if key not in tables:
        tables[key] = torch.tensor([0.0, float("-inf")], device=device).view(1, 2, 1, 1, 1)
    return tables[key]


def _ring_index(slots: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Slots [B, S] as a gather / scatter index into a ring stack t [L, B, W, record]."""
    return slots[None, :, :, None].expand(t.shape[0], -1, -1, t.shape[3])


def _joined(journal: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The journal's token rows along the sequence (one entry per forward step since the checkpoint), and ape."""
    if len(journal) == 1:
        return journal[0]
    return (torch.cat([kv for kv, _, _ in journal], 1), torch.cat([sc for _, sc, _ in journal], 1),
            journal[0][2])
