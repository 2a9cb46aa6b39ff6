"""Exact rollback of a cached step (speculative decoding's verify): snapshot, before a step of S tokens, only the
cache rows that step can overwrite, and afterwards put back what the rejected tokens wrote.

A step of S tokens on a row at position p writes (docs/architecture.md#kv-cache):
  * the window ring's slots (p + i) % W, i < S, which held positions p + i - W (still needed when the tokens
    after p + keep are rejected);
  * compressed-entry and indexer-key rows of the groups completed at positions p .. p+S-1, at most
    ceil(S / m) + 1 rows from group p // m, and the scratch row that takes the masked-out writes;
  * the compressor states (unfinished group, and for CSA the previous group), which a completed group shifts.
The ring slots and store rows are snapshot row by row (a few rows per layer); the compressor states whole (they
hold at most 2m rows) together with the step's own token rows, which the compressors journal while the checkpoint
is open: a rollback restores the old state and re-absorbs the first `keep` token rows, which is exactly what a
step of only those tokens would have left. Entries past the kept length are restored too, so every tensor of the
cache equals that of a step of `keep` tokens, not only the rows a later read can see.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .state import CompressorState, absorb


@dataclass
class LayerCheckpoint:
    ring_slots: list[list[int]]                   # per row: slots of positions p .. p+S-1
    ring: torch.Tensor                            # [B, S, record] the slots' old contents
    store_rows: list[list[int]]                   # per row: entry / key rows the step can write (+ the scratch row)
    stores: list[torch.Tensor]                    # per compressed store: [B, n, record] their old contents
    states: list[tuple[torch.Tensor, torch.Tensor]]   # per compressor state: old (kv, score)


def checkpoint_layer(layer, starts: list[int], n_tokens: int) -> LayerCheckpoint:
    """Snapshot what a step of n_tokens at positions starts[b].. can overwrite in `layer` (a LayerCache)."""
    W, m = layer.window_size, layer.ratio
    dev = layer.window_rows.buf.device
    slots = [[(p + i) % W for i in range(n_tokens)] for p in starts]
    ring = layer.window_rows.buf.gather(1, _index(slots, layer.window_rows.buf, dev))
    rows, stores = [], []
    if m:
        compressed = [s for s in (layer.entry_rows, layer.key_rows) if s is not None]
        n_groups = (n_tokens + m - 1) // m + 1
        limit = compressed[0].rows
        rows = [[g for g in range(p // m, p // m + n_groups) if g < limit] + [limit] for p in starts]
        rows = [r + [r[-1]] * (n_groups + 1 - len(r)) for r in rows]   # pad (with the scratch row) to one width
        stores = [s.buf.gather(1, _index(rows, s.buf, dev)) for s in compressed]
    states = [(st.kv.clone(), st.score.clone()) for st in layer.states()]
    for st in layer.states():
        st.journal = []
    return LayerCheckpoint(slots, ring, rows, stores, states)


def rollback_layer(layer, ckpt: LayerCheckpoint, starts: list[int], keep: list[int], n_tokens: int) -> None:
    """Undo, row by row, what tokens keep[b] .. n_tokens-1 of the checkpointed step wrote to `layer`."""
    m = layer.ratio
    compressed = [s for s in (layer.entry_rows, layer.key_rows) if s is not None]
    journals = [st.journal for st in layer.states()]
    for st in layer.states():
        st.journal = None
    for b, (p, k) in enumerate(zip(starts, keep)):
        if k == n_tokens:
            continue
        ring = layer.window_rows.buf
        for i in range(k, n_tokens):
            ring[b, ckpt.ring_slots[b][i]] = ckpt.ring[b, i]
        if m:
            for store, old in zip(compressed, ckpt.stores):
                for j, g in enumerate(ckpt.store_rows[b]):
                    if g == store.rows or (g + 1) * m - 1 >= p + k:   # the scratch row, or a group not completed
                        store.buf[b, g] = old[b, j]
        for st, (kv, score), journal in zip(layer.states(), ckpt.states, journals):
            st.kv[b] = kv[b]
            st.score[b] = score[b]
            if k and journal:
                tok_kv, tok_score = _joined(journal)
                pos0 = torch.tensor([p], device=st.kv.device)
                absorb(CompressorState(st.kv[b:b + 1], st.score[b:b + 1]), tok_kv[b:b + 1, :k],
                       tok_score[b:b + 1, :k], pos0, m, overlap=st.kv.shape[1] == 2 * m)


def _joined(journal: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The journal's token rows along the sequence (one entry per forward step since the checkpoint)."""
    if len(journal) == 1:
        return journal[0]
    return torch.cat([kv for kv, _ in journal], 1), torch.cat([sc for _, sc in journal], 1)


def _index(rows: list[list[int]], buf: torch.Tensor, device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device).unsqueeze(-1).expand(-1, -1, buf.shape[2])
