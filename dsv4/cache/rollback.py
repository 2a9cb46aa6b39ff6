"""Exact rollback of a cached step (speculative decoding's verify): snapshot, before a step of S tokens, only the
cache rows that step can overwrite, and afterwards put back what the rejected tokens wrote.

A step of S tokens on a row at position p writes (docs/architecture.md#kv-cache):
  * the window ring's slots (p + i) % W, i < S, which held positions p + i - W (still needed when the tokens
    after p + keep are rejected);
  * compressed-entry and indexer-key rows of the groups completed at positions p .. p+S-1, at most
    ceil(S / m) + 1 rows from group p // m, and the scratch row that takes the masked-out writes;
  * the compressor states (unfinished group, and for CSA the previous group), which a completed group shifts.
The ring slots and store rows are snapshot with one gather per store (a few rows per layer and row); the
compressor states whole (at most 2m rows) together with the step's own token rows, which the compressors journal
while the checkpoint is open: a rollback rebuilds the state a step of only the first keep[b] token rows would have
left, as one gather per tensor from (old state, token rows) (state.absorbed; its index is built once per ratio and
layout, for every layer); keeping all of them re-makes the step's own state bit for bit (absorb only moves
values). Rows may keep different counts. Entries past the kept length are restored too, so every tensor of the
cache equals that of a step of `keep` tokens, not only the rows a later read can see.

Both run on device data alone (the rows' start positions and kept counts as tensors), with fixed shapes: no host
value is read, so a CUDA graph can capture them. The index tensors are alike in every layer of the same window and
ratio; a `memo` dict shared by one checkpoint's (or rollback's) layers builds each once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from .state import CompressorState, absorbed, absorbed_index


@dataclass
class LayerCheckpoint:
    ring_index: torch.Tensor                      # [B, S, record] the ring slots of positions p .. p+S-1
    ring: torch.Tensor                            # [B, S, record] their old contents
    groups: torch.Tensor | None                   # [B, n] entry / key rows the step can write (scratch-padded)
    store_index: list[torch.Tensor]               # per compressed store: [B, n, record] them, expanded
    stores: list[torch.Tensor]                    # per compressed store: [B, n, record] their old contents
    states: list[tuple[torch.Tensor, torch.Tensor]]   # per compressor state: old (kv, score)


def checkpoint_layer(layer, starts: torch.Tensor, n_tokens: int, memo: dict | None = None) -> LayerCheckpoint:
    """Snapshot what a step of n_tokens at positions starts[b].. ([B] on the device) can overwrite in `layer`
    (a LayerCache). Device work only, the same whatever the positions."""
    W, m = layer.window_size, layer.ratio
    buf = layer.window_rows.buf
    memo = {} if memo is None else memo
    steps = _once(memo, "steps", lambda: torch.arange(n_tokens, device=buf.device))
    ring_index = _expand(_once(memo, ("ring", W), lambda: (starts[:, None] + steps) % W), buf)
    groups, store_index, stores = None, [], []
    compressed = [s for s in (layer.entry_rows, layer.key_rows) if s is not None]
    if compressed:
        n_groups, limit = (n_tokens + m - 1) // m + 1, compressed[0].rows

        def rows() -> torch.Tensor:   # the groups the step can complete, then the scratch row
            g = (starts[:, None] // m + torch.arange(n_groups, device=buf.device)).clamp(max=limit)
            return torch.cat((g, g.new_full((g.shape[0], 1), limit)), 1)
        groups = _once(memo, ("groups", m, limit), rows)
        store_index = [_expand(groups, s.buf) for s in compressed]
        stores = [s.buf.gather(1, index) for s, index in zip(compressed, store_index)]
    states = [(st.kv.clone(), st.score.clone()) for st in layer.states()]
    for st in layer.states():
        st.journal = []
    return LayerCheckpoint(ring_index, buf.gather(1, ring_index), groups, store_index, stores, states)


def rollback_layer(layer, ckpt: LayerCheckpoint, starts: torch.Tensor, keep: torch.Tensor, n_tokens: int,
                   memo: dict | None = None, counts: set[int] | None = None) -> None:
    """Undo what tokens keep[b] .. n_tokens-1 of the checkpointed step wrote to `layer`, all rows at once (starts,
    keep: [B] on the device). `counts`, the keep values when the host knows them, skips the work no row needs;
    without it the work is the same whatever the counts (no host value is read: a CUDA graph can replay it)."""
    m, buf = layer.ratio, layer.window_rows.buf
    journals = [st.journal for st in layer.states()]
    for st in layer.states():
        st.journal = None
    if counts is not None and counts <= {n_tokens}:
        return
    memo = {} if memo is None else memo
    end_t, rejected = _once(memo, "keep", lambda: (starts + keep, torch.arange(n_tokens, device=buf.device)
                                                   >= keep[:, None]))               # [B], [B, S]
    _restore(buf, ckpt.ring_index, ckpt.ring, rejected)
    compressed = [s for s in (layer.entry_rows, layer.key_rows) if s is not None]
    if compressed:   # rows of groups no kept token completed, and the scratch row
        stale = (ckpt.groups == compressed[0].rows) | ((ckpt.groups + 1) * m - 1 >= end_t[:, None])
        for store, index, old in zip(compressed, ckpt.store_index, ckpt.stores):
            _restore(store.buf, index, old, stale)
    if not any(journals):
        return
    for st, (kv, score), journal in zip(layer.states(), ckpt.states, journals):
        tok_kv, tok_score = _joined(journal)   # the old state with the first keep[b] token rows re-absorbed
        overlap, S = st.kv.shape[1] == 2 * m, tok_kv.shape[1]
        index, live = _once(memo, ("absorbed", m, overlap, S),
                            lambda: absorbed_index(starts, keep, S, m, overlap))
        new_kv, new_score = absorbed(CompressorState(kv, score), tok_kv, tok_score, index, live)
        st.kv.copy_(new_kv)
        st.score.copy_(new_score)


def _restore(buf: torch.Tensor, index: torch.Tensor, old: torch.Tensor, where: torch.Tensor) -> None:
    """buf rows at index := old where `where` [B, n] (else left as they are)."""
    buf.scatter_(1, index, torch.where(where[..., None], old, buf.gather(1, index)))


def _joined(journal: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The journal's token rows along the sequence (one entry per forward step since the checkpoint)."""
    if len(journal) == 1:
        return journal[0]
    return torch.cat([kv for kv, _ in journal], 1), torch.cat([sc for _, sc in journal], 1)


def _once(memo: dict, key: Hashable, make: Callable[[], object]):
    if key not in memo:
        memo[key] = make()
    return memo[key]


def _expand(rows: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Row numbers [B, n] as a gather / scatter index into buf [B, rows, record]."""
    return rows.unsqueeze(-1).expand(-1, -1, buf.shape[2])
