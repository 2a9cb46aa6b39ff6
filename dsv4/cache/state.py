"""What a compressor carries across chunk boundaries, and what it hands the cache
(docs/architecture.md#compressor, #kv-cache).

The compressors (dsv4.model.compressor) update a `CompressorState` in place and return `Compressed` entries;
the cache (dsv4.cache.kv_cache) allocates the states and stores the entries. Both sides import these types
from here, below either of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .step_memo import shared


@dataclass
class CompressorState:
    """fp32 buffers [B, coff*m, coff*Dc] in the reference layout: with overlap, rows 0..m-1 hold the previous
    complete group and rows m..2m-1 the unfinished one; without, rows 0..m-1 hold the unfinished group.
    Scores already include `ape`; empty rows have kv 0 and score -inf (so a fresh state means "position 0")."""
    kv: torch.Tensor
    score: torch.Tensor
    # while a cache checkpoint is open: the (kv, score, ape) token rows each step absorbed (score without the
    # position bias `ape` [ratio, width], which the rollback adds by phase for all layers at once), oldest first, so
    # a rollback can re-absorb the accepted ones (KVCache.checkpoint / rollback)
    journal: list | None = field(default=None, repr=False, compare=False)
    # kv and score as one tensor [2, B, rows, width] over their memory, when they lie so (a state stack's member:
    # dsv4.cache.stacks; `empty`): `absorb` then moves both with one op per step instead of two
    pair: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, batch: int, ratio: int, width: int, overlap: bool, device=None) -> "CompressorState":
        rows = ratio * (2 if overlap else 1)
        pair = torch.stack((torch.zeros(batch, rows, width, device=device),
                            torch.full((batch, rows, width), float("-inf"), device=device)))
        return cls(pair[0], pair[1], pair=pair)

    def reset(self) -> None:
        self.kv.zero_()
        self.score.fill_(float("-inf"))

    def select(self, rows: slice | torch.Tensor) -> "CompressorState":
        """Some rows: views for a slice (the pair too), copies for an index tensor (no pair: KVCache.gather_rows
        binds the copies to a stack of their own)."""
        pair = self.pair[:, rows] if self.pair is not None and isinstance(rows, slice) else None
        return CompressorState(self.kv[rows], self.score[rows], pair=pair)

    def record(self, kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor) -> None:
        """Keep a step's token rows [B, S, width] (score without the bias `ape`) while a checkpoint is open."""
        if self.journal is not None:
            self.journal.append((kv, score, ape))


def absorb(state: CompressorState, kv: torch.Tensor, score: torch.Tensor, pos0: torch.Tensor, ratio: int,
           overlap: bool):
    """Append token rows kv, score [B, S, width] (score with `ape` added) to the groups of `state` (row b at
    positions pos0[b]..): align each row's tokens to its group boundary (prepending the unfinished group kept in
    `state`), say which groups complete, and update `state` in place (previous group, new unfinished tail).

    Returns (buf_kv, buf_sc [B, L, width] group-aligned, n groups spanned, valid [B, n], prev (overlap: the
    previous complete group's (kv, score) before this chunk, else None)). The compressor pools the groups; a
    cache rollback rebuilds its state update alone (`absorbed_table`, `absorbed`)."""
    B, S, width = kv.shape
    m = ratio
    d = width // 2 if overlap else width
    off = m if overlap else 0
    L = S + m - 1
    n = L // m
    ix = shared(pos0, ("absorb", S, m), lambda: _AbsorbIndex.make(pos0, S, m))
    if state.pair is not None and not torch.is_grad_enabled():
        return _absorb_pair(state.pair[:, :B], kv, score, pos0, ix, m, off, d, n, overlap)
    buf_kv = torch.cat((torch.where(ix.keep, state.kv[:B, off:off + m - 1], 0.0), kv.new_zeros(B, S, width)), 1)
    buf_sc = torch.cat((torch.where(ix.keep, state.score[:B, off:off + m - 1], float("-inf")),
                        kv.new_full((B, S, width), float("-inf"))), 1)
    at = ix.at.expand(-1, -1, width)
    buf_kv = buf_kv.scatter(1, at, kv)                                 # [B, L, width], group-aligned
    buf_sc = buf_sc.scatter(1, at, score)
    prev = None
    if overlap:
        prev = state.kv[:B, :m, :d].clone(), state.score[:B, :m, :d].clone()
    # new state: the last complete group (overlap) and the tokens after it
    if overlap:
        idx = ix.prev.expand(-1, -1, width)
        state.kv[:B, :m] = torch.where(ix.has, buf_kv.gather(1, idx), state.kv[:B, :m])
        state.score[:B, :m] = torch.where(ix.has, buf_sc.gather(1, idx), state.score[:B, :m])
    idx = ix.tail.expand(-1, -1, width)
    state.kv[:B, off:off + m] = torch.where(ix.live, buf_kv.gather(1, idx), 0.0)
    state.score[:B, off:off + m] = torch.where(ix.live, buf_sc.gather(1, idx), float("-inf"))
    return buf_kv, buf_sc, n, ix.valid, prev


def _absorb_pair(pair: torch.Tensor, kv: torch.Tensor, score: torch.Tensor, pos0: torch.Tensor, ix: "_AbsorbIndex",
                 m: int, off: int, d: int, n: int, overlap: bool):
    """`absorb` of a state whose kv and score lie as one tensor `pair` [2, B, rows, width] (inference): each step
    below moves kv and score in one op where absorb moves them in two (11 ops for an overlapping state, 7 for
    another, against 26 and 18). The same copies, selections and scatters of the same values: equal bit for bit."""
    B, S, width = kv.shape
    empty = shared(pos0, ("empty_pair", kv.dtype), lambda: torch.stack(   # [2, 1, 1, 1]: kv 0, score -inf
        (kv.new_zeros(1, 1, 1), kv.new_full((1, 1, 1), float("-inf")))))
    head = torch.where(ix.keep, pair[:, :, off:off + m - 1], empty)                  # the pending rows that hold tokens
    buf = torch.cat((head, empty.expand(2, B, S, width)), 2)
    buf.scatter_(2, ix.at.expand(2, -1, -1, width), torch.stack((kv, score)))      # [2, B, L, width], group-aligned
    prev = None
    if overlap:
        kept = pair[:, :, :m, :d].clone()
        prev = kept[0], kept[1]
        pair[:, :, :m] = torch.where(ix.has, buf.gather(2, ix.prev.expand(2, -1, -1, width)), pair[:, :, :m])
    pair[:, :, off:off + m] = torch.where(ix.live, buf.gather(2, ix.tail.expand(2, -1, -1, width)), empty)
    return buf[0], buf[1], n, ix.valid, prev


@dataclass
class _AbsorbIndex:
    """absorb's index tensors for rows at positions pos0 taking S tokens at ratio m: alike for every compressor
    of that ratio in a step (main and indexer, every layer), so they are made once per step (`shared`)."""
    keep: torch.Tensor    # [B, m-1, 1] the state's pending rows that hold tokens (r0 = pos0 % m of them)
    at: torch.Tensor      # [B, S, 1] each token's row in the group-aligned buffer
    valid: torch.Tensor   # [B, n] the groups the chunk completes
    has: torch.Tensor     # [B, 1, 1] a group completes (the overlap's previous group moves)
    prev: torch.Tensor    # [B, m, 1] the buffer rows of the last complete group
    tail: torch.Tensor    # [B, m, 1] the buffer rows of the new unfinished group
    live: torch.Tensor    # [B, m, 1] which of those hold tokens

    @classmethod
    def make(cls, pos0: torch.Tensor, S: int, m: int) -> "_AbsorbIndex":
        device, L = pos0.device, S + m - 1
        r0 = pos0 % m                                                   # tokens already pending per row
        keep = (torch.arange(m - 1, device=device) < r0.unsqueeze(1)).unsqueeze(-1)
        at = (r0.unsqueeze(1) + torch.arange(S, device=device)).unsqueeze(-1)
        total = r0 + S
        valid = (torch.arange(L // m, device=device) + 1) * m <= total.unsqueeze(1)
        done = total // m                                               # complete groups per row
        rows = torch.arange(m, device=device)

        def rows_from(start: torch.Tensor) -> torch.Tensor:
            return (start.unsqueeze(1) + rows).clamp(0, L - 1).unsqueeze(-1)
        return cls(keep, at, valid, (done > 0).view(-1, 1, 1), rows_from((done - 1) * m), rows_from(done * m),
                   (rows < (total - done * m).unsqueeze(1)).unsqueeze(-1))


def absorbed_index(pos0: torch.Tensor, count: torch.Tensor, n_tokens: int, ratio: int, overlap: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row of the state that `absorb` leaves after count[b] of n_tokens token rows comes from, as an
    index into cat((old state rows, token rows), 1) [B, R + n_tokens, width] (R = the state's rows), and which of
    them hold data ([B, R, 1] bool; the rest are empty: kv 0, score -inf). Row b's tokens sit at positions
    pos0[b]..; the index is alike for every state of this ratio and layout, so a rollback builds it once.

    The group-aligned sequence `absorb` builds is the old unfinished group's r0 = pos0 % ratio rows, then the
    tokens: its entry q is old state row off + q for q < r0 (off = ratio with overlap, else 0), else token row
    q - r0. With total = r0 + count and done = total // ratio complete groups, the new unfinished group is
    entries done * ratio + t (t < total - done * ratio), and with overlap the previous group is entries
    (done - 1) * ratio + t if done > 0, else the old one (state rows t)."""
    m, R = ratio, ratio * (2 if overlap else 1)
    off = m if overlap else 0
    r0 = pos0 % m
    total = r0 + count
    done = total // m
    t = torch.arange(m, device=pos0.device)

    def source(q: torch.Tensor) -> torch.Tensor:   # entry q of the aligned sequence -> the cat's row
        return torch.where(q < r0[:, None], off + q, R + q - r0[:, None]).clamp(0, R + n_tokens - 1)
    tail = source(done[:, None] * m + t)
    live = t < (total - done * m)[:, None]
    if overlap:
        prev = torch.where((done > 0)[:, None], source((done[:, None] - 1) * m + t), t)
        tail, live = torch.cat((prev, tail), 1), torch.cat((torch.ones_like(live), live), 1)
    return tail, live.unsqueeze(-1)


def absorbed_table(ratio: int, overlap: bool, n_tokens: int, device=None) -> torch.Tensor:
    """`absorbed_index` for every (r0 = position % ratio, count 0..n_tokens) at once, as [ratio, n_tokens + 1, R]
    long: indices into cat((old state [R rows], token rows [n_tokens], one empty row)), the rows holding no data
    pointed at the empty row. A rollback looks its rows' indices up with one index op (table[r0, count])."""
    r0 = torch.arange(ratio, device=device).repeat_interleave(n_tokens + 1)
    count = torch.arange(n_tokens + 1, device=device).repeat(ratio)
    index, live = absorbed_index(r0, count, n_tokens, ratio, overlap)
    R = index.shape[1]
    return torch.where(live[..., 0], index, R + n_tokens).view(ratio, n_tokens + 1, R)


def absorbed(old: torch.Tensor, tokens: torch.Tensor, index: torch.Tensor, empty: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """The states `absorb` leaves, for stacked states: old [L, 2, B, R, width] ((kv, score) of L states before the
    tokens), tokens [L, 2, B, S, width] (their token rows, score with `ape` added), index [B, R] (absorbed_table
    looked up at each row's (r0, count)), empty [1, 2, 1, 1, 1] (kv 0, score -inf). One gather of values, so equal
    to absorb's bit for bit. `out`: write there (the live stack) instead of a new tensor."""
    L, _, B, R, width = old.shape
    src = torch.cat((old, tokens, empty.expand(L, 2, B, 1, width)), 3)
    return torch.gather(src, 3, index[None, None, :, :, None].expand(L, 2, B, R, width), out=out)


@dataclass
class Compressed:
    """Entries a chunk completed: entries[b, g] is group first_group[b] + g (or rows[b, g] when given), real where
    valid[b, g]."""
    entries: torch.Tensor       # [B, n, Dc]
    first_group: torch.Tensor   # [B] int64
    valid: torch.Tensor | None  # [B, n] bool; None means all valid
    rows: torch.Tensor | None = None   # [B, n] int64: each entry's group, when not first_group + g

    def groups(self) -> torch.Tensor:
        """[B, n]: the group (cache row) of each entry."""
        if self.rows is not None:
            return self.rows
        return self.first_group.unsqueeze(1) + torch.arange(self.entries.shape[1], device=self.entries.device)
