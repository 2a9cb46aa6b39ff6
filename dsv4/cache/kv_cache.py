"""The V4 inference cache: per layer only what the reference keeps (docs/architecture.md#kv-cache).

  * a `window_size`-slot ring of raw KV rows (slot = position % window), every layer;
  * compressed KV entries, one row per completed group (row = group index), CSA and HCA layers;
  * lightning-indexer keys, one row per completed group, CSA layers;
  * the fp32 compressor state: the unfinished group, and for CSA the previous group (main and indexer).
Never T x dim raw KV. Rows of a batch keep their own positions, so sequences of different lengths share
a batch: prefill each row (or equal-length rows together) through `select(...)`, then decode all rows
one token each at their own positions.

A forward step writes every layer's part of the cache before the rows' positions advance, so a step that fails
midway (out of memory in layer 3, say) leaves state that no longer matches the positions. The step therefore
marks its rows damaged when it starts (`begin_step`) and clears the mark when it commits (`end`); any later use
of a damaged row raises `CacheDamaged` until the row is reset. Other rows stay usable.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import DsV4Error
from .layout import RowStore
from .rollback import StackCheckpoint, checkpoint, empty_row, rollback
from .stacks import stack_layers
from .state import Compressed, CompressorState
from .step_memo import shared


class CacheDamaged(DsV4Error, RuntimeError):
    """A cache row was used after a forward step on it failed midway, leaving its state inconsistent."""


class LayerCache:
    """One layer's cache. The attention calls: window(), write_window(), add_entries()/entries(),
    add_keys()/keys(); `compressor_state`/`indexer_state` are updated by the compressors in place."""

    def __init__(self, cfg: ModelConfig, layer_id: int, batch: int, max_seq_len: int, kv_format: str,
                 index_format: str, dtype: torch.dtype, device, _views: dict | None = None):
        self.window_size = cfg.window_size
        self.ratio = cfg.compress_ratios[layer_id]
        self.kind = cfg.layer_kind(layer_id)
        self.end_max = 0  # set by KVCache.begin: the largest position + 1 any row reaches in this chunk
        self.fixed_shapes = False  # read every stored row (masked by position), so shapes never change
        if _views is not None:
            self.__dict__.update(_views)
            return
        D, rd, m = cfg.head_dim, cfg.rope_head_dim, self.ratio
        self.window_rows = RowStore(kv_format, batch, cfg.window_size, D, rd, "kv", dtype, device)
        self.entry_rows = self.key_rows = self.compressor_state = self.indexer_state = None
        if m:
            self.entry_rows = RowStore(kv_format, batch, max_seq_len // m, D, rd, "kv", dtype, device, scratch=True)
            overlap = self.kind == "csa"
            self.compressor_state = CompressorState.empty(batch, m, (2 if overlap else 1) * D, overlap, device)
        if self.kind == "csa":
            Di = cfg.index_head_dim
            self.key_rows = RowStore(index_format, batch, max_seq_len // m, Di, rd, "index", dtype, device,
                                     scratch=True)
            self.indexer_state = CompressorState.empty(batch, m, 2 * Di, True, device)

    def stores(self) -> list:
        return [s for s in (self.window_rows, self.entry_rows, self.key_rows) if s is not None]

    def states(self) -> list[CompressorState]:
        return [s for s in (self.compressor_state, self.indexer_state) if s is not None]

    def select(self, rows: slice | torch.Tensor) -> "LayerCache":
        """Some rows: views sharing storage for a slice, copies for an index tensor (KVCache.gather_rows)."""
        views = {"window_rows": self.window_rows.select(rows),
                 "entry_rows": self.entry_rows.select(rows) if self.entry_rows else None,
                 "key_rows": self.key_rows.select(rows) if self.key_rows else None,
                 "compressor_state": self.compressor_state.select(rows) if self.compressor_state else None,
                 "indexer_state": self.indexer_state.select(rows) if self.indexer_state else None}
        out = object.__new__(LayerCache)
        out.__dict__.update(window_size=self.window_size, ratio=self.ratio, kind=self.kind, end_max=0,
                            fixed_shapes=self.fixed_shapes, **views)
        return out

    def reset(self) -> None:
        for s in self.states():
            s.reset()

    # ------------------------------------------------------------------ the attention's interface
    def window(self, pos0: torch.Tensor) -> torch.Tensor:
        """Raw KV of positions pos0-W+1 .. pos0-1 per row: [B, W-1, D] (rows before position 0 are junk)."""
        W = self.window_size
        slots = shared(pos0, ("window_slots", W), lambda: (pos0.unsqueeze(1) - (W - 1)
                                                           + torch.arange(W - 1, device=pos0.device)) % W)
        return self.window_rows.gather(slots)

    def window_ring(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The ring itself [B, W, D] when it holds rows of `dtype` (slot = position % W), else None (FP8 records,
        or another float dtype): after write_window, a decode step's attention reads it in place instead of a
        gathered copy."""
        buf = self.window_rows.buf
        return buf if self.window_rows.fmt != "fp8" and buf.dtype == dtype else None

    def write_window(self, pos0: torch.Tensor, kv: torch.Tensor) -> None:
        """Put the chunk's raw KV [B, S, D] in the ring (only its last W rows can matter)."""
        W, S = self.window_size, kv.shape[1]
        keep = min(S, W)
        slots = shared(pos0, ("write_slots", S, W),
                       lambda: (pos0.unsqueeze(1) + torch.arange(S - keep, S, device=kv.device)) % W)
        self.window_rows.write(slots, kv[:, S - keep:])

    def plan_write(self, pos0: torch.Tensor, slots: torch.Tensor) -> None:
        """Give a step's start positions pos0 [B] the ring slots [B, S] (positions % W, S <= W) that `write_window`
        of its S tokens would make (in its step memo): made ahead for several forwards of one step at once."""
        if slots.shape[1] > self.window_size:
            raise ValueError(f"plan_write: {slots.shape[1]} tokens, more than the window ring's {self.window_size}")
        shared(pos0, ("write_slots", slots.shape[1], self.window_size), lambda: slots)

    def add_entries(self, c: Compressed) -> None:
        self._add(self.entry_rows, c)

    def add_keys(self, c: Compressed) -> None:
        self._add(self.key_rows, c)

    def entries(self) -> torch.Tensor:
        """Every compressed entry any row can see by the end of this chunk: [B, end_max // ratio, D]
        (all rows with fixed_shapes; the callers mask by position)."""
        return self.entry_rows.read(self._n_rows())

    def entry_records(self) -> torch.Tensor | None:
        """The entries() rows as stored when they are FP8 serving records (uint8 [B, n, 584]), else None."""
        if self.entry_rows.fmt == "fp8":
            return self.entry_rows.records(self._n_rows())
        return None

    def keys(self) -> torch.Tensor:
        """Indexer keys of every entry any row can see: floats, or the FP4 records as stored (the indexer
        kernels read those in place)."""
        if self.key_rows.fmt == "fp4":
            return self.key_rows.records(self._n_rows())
        return self.key_rows.read(self._n_rows())

    def _n_rows(self) -> int:
        return self.entry_rows.rows if self.fixed_shapes else self.end_max // self.ratio

    @staticmethod
    def _add(store: RowStore, c: Compressed) -> None:
        n = c.entries.shape[1]
        if n == 0:
            return
        index = c.rows if c.rows is not None else shared(c.first_group, ("rows", n), c.groups)
        store.write(index, c.entries, c.valid)


class CacheCheckpoint:
    """What `KVCache.checkpoint` saved: the rows' start positions (host list and device tensor), the step length
    and the snapshot of the stacked rings and states (None: a host-side record only)."""

    def __init__(self, starts: list[int], n_tokens: int, parts: StackCheckpoint | None, starts_t: torch.Tensor):
        self.starts, self.n_tokens, self.parts, self.starts_t = starts, n_tokens, parts, starts_t


class KVCache:
    """Model-level cache: one LayerCache per main layer plus each row's position.

    `model(tokens, cache=cache)` appends tokens [B, S] to every row (row b at `positions[b]`) and returns
    their logits. `select(slice)` gives a view of some rows (shared storage) to prefill them apart.
    With `mtp=True` the layers are the MTP blocks' (layer ids n_layers ..), for drafting speculative tokens.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_seq_len: int, kv_dtype: str = "auto",
                 index_dtype: str = "auto", dtype: torch.dtype = torch.float32, device=None, mtp: bool = False):
        if batch_size <= 0 or max_seq_len <= 0:
            raise ValueError(f"batch_size={batch_size} and max_seq_len={max_seq_len} must be positive")
        auto = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        self.kv_dtype = auto if kv_dtype == "auto" else kv_dtype
        self.index_dtype = auto if index_dtype == "auto" else index_dtype
        self.config, self.max_seq_len, self.dtype = cfg, max_seq_len, dtype
        ids = range(cfg.n_layers, cfg.n_layers + cfg.n_mtp_layers) if mtp else range(cfg.n_layers)
        self.mtp = mtp
        self.layers = [LayerCache(cfg, i, batch_size, max_seq_len, self.kv_dtype, self.index_dtype, dtype, device)
                       for i in ids]
        # every layer's window ring and compressor states as views of a few stacked tensors (dsv4.cache.stacks):
        # a checkpoint / rollback is then a few ops per stack, not per layer
        self._rings, self._state_stacks = stack_layers(self.layers)
        self._tables: dict = {}   # the rollback's constants (shared by every view of this cache)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        empty_row(self._tables, self.positions.device)
        self._host = [0] * batch_size  # host mirror of positions: shapes never need a device sync
        self._damaged = [False] * batch_size  # rows inside a step that has not committed (see the module doc)

    @property
    def layers(self) -> list[LayerCache]:
        """The per-layer caches. A row view makes its layers' views when first asked: a view that only resets
        its rows or reads their lengths (the serving engine's, per request) never builds them (a few us each, per
        layer)."""
        if self._layers is None:
            parents, rows = self._layer_rows
            self._layers, self._layer_rows = [layer.select(rows) for layer in parents], None
        return self._layers

    def layer_rows(self) -> tuple[list[LayerCache], range]:
        """(layer caches, the rows of their batch this cache is): the parent's layers and this view's rows while
        the view's own layer views are not made (reading a row's records then makes none), else its own and all."""
        if self._layers is None:
            parents, rows = self._layer_rows
            return parents, range(parents[0].window_rows.buf.shape[0])[rows] if parents else range(0)
        return self._layers, range(len(self._host))

    @layers.setter
    def layers(self, value: list[LayerCache]) -> None:
        self._layers, self._layer_rows = value, None

    @property
    def batch_size(self) -> int:
        return len(self._host)

    def lengths(self) -> list[int]:
        return list(self._host)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for layer in self.layers for s in layer.stores()) + \
            sum(st.kv.nbytes + st.score.nbytes for layer in self.layers for st in layer.states())

    def select(self, rows: slice | int) -> "KVCache":
        """A view of some rows sharing this cache's storage (writes through)."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        out = object.__new__(KVCache)
        out.__dict__.update(self.__dict__)
        out._layers, out._layer_rows = None, (self.layers, rows)   # made on first use (see `layers`)
        out._rings = [s.select(rows) for s in self._rings]
        out._state_stacks = [s.select(rows) for s in self._state_stacks]
        out.positions = self.positions[rows]
        out._host, out._damaged = _view(self._host, rows), _view(self._damaged, rows)
        return out

    def gather_rows(self, rows: list[int]) -> "KVCache":
        """A copy of some rows (any set, in the order given) as a cache of its own: rows that are not adjacent
        run one forward on the copy, then `scatter_rows` puts them back. Every stored tensor of the rows is copied
        both ways, far less than a prefill chunk's compute."""
        self.check_intact(rows)
        index = _on_device(rows, self.positions.device)   # (sent ahead: a blocking copy would wait for the device)
        out = object.__new__(KVCache)
        out.__dict__.update(self.__dict__)
        out.layers = [layer.select(index) for layer in self.layers]
        out._rings = [s.gathered(index, out.layers) for s in self._rings]
        out._state_stacks = [s.gathered(index, out.layers) for s in self._state_stacks]
        out.positions = self.positions[index]
        out._host, out._damaged = [self._host[r] for r in rows], [False] * len(rows)
        return out

    def scatter_rows(self, rows: list[int], part: "KVCache") -> None:
        """Write back rows `gather_rows(rows)` copied into `part` (after its forward committed)."""
        part.check_intact()
        index = _on_device(rows, self.positions.device)
        for mine, theirs in zip(self.layers, part.layers):
            for a, b in zip(mine.stores(), theirs.stores()):
                a.buf.index_copy_(0, index, b.buf)
            for a, b in zip(mine.states(), theirs.states()):
                a.kv.index_copy_(0, index, b.kv)
                a.score.index_copy_(0, index, b.score)
        self.positions.index_copy_(0, index, part.positions)
        for i, r in enumerate(rows):
            self._host[r] = part._host[i]

    # ------------------------------------------------------------------ step integrity
    @property
    def damaged_rows(self) -> list[int]:
        """Rows (numbered as in this view) whose last forward step failed midway; unusable until reset."""
        return [i for i, bad in enumerate(self._damaged) if bad]

    def check_intact(self, rows: list[int] | None = None) -> None:
        """Raise CacheDamaged if any of `rows` (default: every row of this view) is damaged."""
        bad = [i for i in (range(self.batch_size) if rows is None else rows) if self._damaged[i]]
        if bad:
            names = [_root_row(self._damaged, i) for i in bad]
            raise CacheDamaged(
                f"cache row(s) {names} are damaged: a forward step on them failed midway, after some layers had "
                f"written their part of the cache, so their state no longer matches their length. Reset them "
                f"(cache.select(row).reset()) or start a fresh cache")

    def begin_step(self, n_tokens: int) -> int:
        """Start appending n_tokens to every row: check the rows are intact and have room, then mark them damaged
        until `end` commits the step. Returns the largest end position."""
        self.check_intact()
        end = self.check_room(n_tokens)
        for i in range(self.batch_size):
            self._damaged[i] = True
        return end

    def host_state(self) -> tuple[list[int], list[bool]]:
        """The host-side bookkeeping (position mirror, damage marks), for a caller that runs a step that executes
        nothing on the device (a CUDA graph capture) and must undo what the step did on the host."""
        return list(self._host), list(self._damaged)

    def restore_host_state(self, state: tuple[list[int], list[bool]]) -> None:
        for i, (pos, bad) in enumerate(zip(*state)):
            self._host[i], self._damaged[i] = pos, bad

    def broadcast_row(self, src: int) -> "KVCache":
        """Give every row row `src`'s state (its context and position): prefill a prompt once, then decode
        several continuations of it in one batch."""
        self.check_intact([src])
        for layer in self.layers:
            for t in [s.buf for s in layer.stores()] + [x for st in layer.states() for x in (st.kv, st.score)]:
                t.copy_(t[src:src + 1].expand_as(t))
        self.positions.fill_(self._host[src])
        for i in range(len(self._host)):
            self._host[i], self._damaged[i] = self._host[src], False
        return self

    # ------------------------------------------------------------------ speculative steps
    def checkpoint(self, n_tokens: int, planned: bool = False) -> CacheCheckpoint:
        """Snapshot what the next step(s) of n_tokens in all can overwrite, so `rollback` can keep any prefix of
        them exactly. Cheap: the ring slots the step writes and the compressor states, one op per stack.
        `planned`: the steps start at positions made from the checkpoint's (`plan_window`: their forwards leave
        the device positions to the rollback), so the positions are read in place rather than copied."""
        if not 0 < n_tokens <= self.config.window_size:
            raise ValueError(f"checkpoint n_tokens={n_tokens}: must be in 1..window_size={self.config.window_size}")
        self.check_intact()
        self.check_room(n_tokens)
        starts = self.positions if planned else self.positions.clone()
        parts = checkpoint(self._rings, self._state_stacks, self.layers, starts, n_tokens, self.config.window_size,
                           self._tables)
        return CacheCheckpoint(list(self._host), n_tokens, parts, starts)

    def rollback(self, ckpt: CacheCheckpoint, keep: list[int] | int) -> "KVCache":
        """Keep only the first keep[b] tokens each row appended since `ckpt` (one int: every row), in one step or
        several: afterwards the cache is that of appending just those tokens (every tensor a later step reads: the
        ring, the states, the positions and the entry / key rows of complete groups; rows of groups only a rejected
        token completed stay, unread, as dsv4.cache.rollback says; values equal up to the rounding of steps of
        other lengths, as the kept tokens were computed in a longer step)."""
        keep = [keep] * self.batch_size if isinstance(keep, int) else list(keep)
        self._check_keep(ckpt, keep)
        keep_t = _on_device(keep, self.positions.device)
        self._rollback(ckpt, keep_t, set(keep))
        return self.end_rollback(ckpt, keep)

    def rollback_on_device(self, ckpt: CacheCheckpoint, keep: torch.Tensor) -> None:
        """`rollback` by device data alone: keep [B] on the device, the same work whatever its values, no host
        value read (a CUDA graph can replay it). The host mirror of the positions is left to `end_rollback`,
        once the caller has the counts on the host."""
        self._rollback(ckpt, keep, None)

    def end_rollback(self, ckpt: CacheCheckpoint, keep: list[int]) -> "KVCache":
        """The host side of `rollback_on_device`: the rows' positions become their starts + keep[b]."""
        self._check_keep(ckpt, keep)
        for i, (p, k) in enumerate(zip(ckpt.starts, keep)):
            self._host[i] = p + k
        return self

    def rewind(self, n: int = 1) -> "KVCache":
        """Move every row back n positions without restoring what it wrote. Only for a cache of window rings
        alone (no compressed entries or compressor states). One position back is exact: a query at position p
        reads the positions p - W + 1 .. p, never the slot of p - W, so the next step (which appends at the rewound
        position p, rewriting its slot) sees the cache of the shorter sequence exactly. n positions back, the
        slots of p + 1 .. p + n - 1 still hold the rewound positions instead of p + 1 - W .. p + n - 1 - W, which
        the queries at p .. p + n - 2 would read: only a next step of at least n tokens whose earlier outputs are
        not used (a catch-up that keeps its last output) sees the shorter sequence exactly where it is read."""
        if any(layer.ratio for layer in self.layers):
            raise ValueError("rewind needs a cache of window rings alone (a compressor's state cannot be rewound)")
        if not all(h >= n for h in self._host):
            raise ValueError(f"rewind {n}: rows hold {self.lengths()} tokens")
        self.check_intact()
        self.positions -= n
        for i in range(len(self._host)):
            self._host[i] -= n
        return self

    def _check_keep(self, ckpt: CacheCheckpoint, keep: list[int]) -> None:
        moved = [h - p for h, p in zip(self._host, ckpt.starts)]
        if len(keep) != self.batch_size or any(not 0 <= k <= n <= ckpt.n_tokens for k, n in zip(keep, moved)):
            raise ValueError(f"rollback keep={keep}: needs one count per row ({self.batch_size} rows), each at most "
                             f"the tokens the row appended since the checkpoint ({moved}, at most {ckpt.n_tokens})")

    def _rollback(self, ckpt: CacheCheckpoint, keep: torch.Tensor, counts: set[int] | None) -> None:
        rollback(self._rings, self._state_stacks, self.layers, ckpt.parts, ckpt.starts_t, keep, ckpt.n_tokens,
                 self._tables, counts)
        torch.add(ckpt.starts_t, keep, out=self.positions)

    def set_fixed_shapes(self, enabled: bool = True) -> "KVCache":
        """Make every step read all stored rows (masked by position) instead of the rows reached so far: more
        bytes read, but the same shapes every step, as a captured CUDA graph needs."""
        for layer in self.layers:
            layer.fixed_shapes = enabled
        return self

    def reset(self) -> "KVCache":
        """Start new sequences in every row of this (view of the) cache: every compressor state empty (kv 0,
        score -inf), one copy per state stack (every layer's states are views of the stacks), and position 0."""
        empty = empty_row(self._tables, self.positions.device)
        for s in self._state_stacks:
            s.t.copy_(empty.expand_as(s.t))
        self.positions.zero_()
        for i in range(len(self._host)):
            self._host[i], self._damaged[i] = 0, False
        return self

    # ------------------------------------------------------------------ called by Transformer.hidden
    def begin(self, shape: torch.Size, pos0: torch.Tensor | None = None) -> torch.Tensor:
        """Start a step of tokens [B, S]: its start positions [B] (a copy of the rows' positions, or `pos0`, the
        caller's own for the step: e.g. `Attention.plan_cached`'s)."""
        B, S = shape
        if B != self.batch_size:
            raise ValueError(f"tokens have batch {B}, the cache holds {self.batch_size} rows "
                             "(use cache.select(rows) for a subset)")
        end = self.begin_step(S)
        for layer in self.layers:
            layer.end_max = end
        return self.positions.clone() if pos0 is None else pos0

    def check_room(self, n_tokens: int) -> int:
        """Raise unless every row can take n_tokens more; return the largest end position."""
        end = max(self._host) + n_tokens
        if end > self.max_seq_len:
            raise ValueError(f"cache full: a row would reach position {end} > max_seq_len={self.max_seq_len}")
        return end

    def end(self, n_tokens: int, device: bool = True) -> None:
        """Commit a step: advance every row by n_tokens and clear its damage mark (device=False: only the host
        mirror advances, when a replayed graph advances the device positions itself)."""
        if device:
            self.positions += n_tokens
        for i in range(len(self._host)):
            self._host[i] += n_tokens
            self._damaged[i] = False

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]


def _on_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A list as a long tensor on `device`; on a GPU sent from pinned memory, so the host does not wait for the
    kernels queued before it (as a blocking copy would)."""
    host = torch.tensor(values, dtype=torch.long)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


class _HostView:
    """A list-like window onto some entries of the root cache's host lists (positions, damage marks)."""

    def __init__(self, base: list[int], rows: range):
        self.base, self.rows = base, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> int:
        return self.base[self.rows[i]]

    def __setitem__(self, i: int, v: int) -> None:
        self.base[self.rows[i]] = v

    def __iter__(self):
        return (self.base[r] for r in self.rows)


def _view(values: list | _HostView, rows: slice) -> _HostView:
    """A view of some entries of `values`, always over the root list (a view of a view composes the ranges)."""
    if isinstance(values, _HostView):
        return _HostView(values.base, values.rows[rows])
    return _HostView(values, range(len(values))[rows])


def _root_row(values: list | _HostView, i: int) -> int:
    """Entry i of a (view of a) host list, numbered as in the root cache."""
    return values.rows[i] if isinstance(values, _HostView) else i
