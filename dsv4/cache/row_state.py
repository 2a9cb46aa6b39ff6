"""Everything one cache row holds after n tokens, as named tensors, and putting it back: what a saved prefix is.

Per layer: the whole window ring, the first n // ratio compressed entries and indexer keys (raw records: exact
whatever the storage format) and the compressor states (main and indexer). Together with the position n this is
the row's whole state, so a row restored from it continues bit for bit as the row it was taken from. The names
are the on-disk prefix store's tensor names (generate/prefix_store.py); the in-memory prefix cache
(serve/prefix_cache.py) keeps the same dict.
"""
from __future__ import annotations

import torch

from .kv_cache import KVCache

__all__ = ["row_state", "RowStateCopy", "restore_row_state", "restore_row_pieces", "state_nbytes", "copy_tensors",
           "clone_tensors", "GROWING"]

GROWING = (".entries", ".keys")   # the tensors that grow with n (one record per `ratio` tokens); the rest is
                                  # fixed-size (window ring, compressor states)


def _check_one_row(cache: KVCache, what: str) -> None:
    if cache.batch_size != 1:
        raise ValueError(f"{what} needs a one-row cache (use cache.select(row)), got {cache.batch_size} rows")


def row_state(cache: KVCache, n: int, start: int = 0) -> dict[str, torch.Tensor]:
    """Views (no copy) of the state of a one-row cache that holds exactly n tokens. A row a failed step left
    half-written raises CacheDamaged: it must never be stored. `start` > 0 takes only the compressed entries and
    indexer keys past the first `start` tokens' (a piece to put after a stored state of `start` tokens)."""
    _check_one_row(cache, "row_state")
    if cache.lengths() != [n]:
        raise ValueError(f"the row holds {cache.lengths()[0]} tokens, not the {n} to be stored")
    cache.check_intact()
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(cache.layers):
        out[f"{i}.window"] = layer.window_rows.buf[0]
        if layer.entry_rows is not None:
            out[f"{i}.entries"] = layer.entry_rows.buf[0, start // layer.ratio: n // layer.ratio]
        if layer.key_rows is not None:
            out[f"{i}.keys"] = layer.key_rows.buf[0, start // layer.ratio: n // layer.ratio]
        for tag, st in (("cstate", layer.compressor_state), ("istate", layer.indexer_state)):
            if st is not None:
                out[f"{i}.{tag}.kv"], out[f"{i}.{tag}.score"] = st.kv[0], st.score[0]
    return {k: v.detach() for k, v in out.items()}


_STATE_TAGS = {"compressor_state": "cstate", "indexer_state": "istate"}


class RowStateCopy:
    """A copy of `row_state(cache, n)` of a one-row cache, taken in few ops: the row of each stacked tensor (every
    layer's window ring of one shape, every compressor state of one layout: dsv4.cache.stacks) in one copy, and the
    compressed entries and indexer keys of all layers in one `cat` per record width and dtype. `tensors()` gives
    row_state's names and order, views of these copies, made when first asked for: a serving engine copies a row the
    moment its request ends (per-tensor Python there costs ~60 tensor calls a row on a 4-layer model) and reads the
    names later, when it stores the copy. The copies are this object's own: nothing else shares their memory."""

    def __init__(self, cache: KVCache, n: int):
        _check_one_row(cache, "row_state")
        if cache.lengths() != [n]:
            raise ValueError(f"the row holds {cache.lengths()[0]} tokens, not the {n} to be stored")
        cache.check_intact()
        self.n = n
        layers, rows = cache.layer_rows()   # (the row in its parent's layers: a row view makes no layer views here)
        row = rows[0]
        self.ratios = [layer.ratio for layer in layers]
        # (members [(layer, attribute)], the row's copy [L_s, ...]) per stack
        self._stacks = [(s.members, s.t.select(s.bdim, 0).detach().clone())
                        for s in (*cache._rings, *cache._state_stacks)]
        groups: dict[tuple, tuple[list[str], list[torch.Tensor]]] = {}
        for i, layer in enumerate(layers):
            for store, tag in ((layer.entry_rows, "entries"), (layer.key_rows, "keys")):
                if store is not None:
                    part = store.buf[row, : n // layer.ratio]
                    names, parts = groups.setdefault((part.dtype, part.shape[1:]), ([], []))
                    names.append(f"{i}.{tag}")
                    parts.append(part)
        # (names, their record counts, the records of all of them in one tensor) per width and dtype
        self._growing = [(names, [p.shape[0] for p in parts], torch.cat(parts).detach())
                         for names, parts in groups.values()]
        self._tensors: dict[str, torch.Tensor] | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The copy as row_state names it (views of this object's tensors; made once)."""
        if self._tensors is None:
            named: dict[str, torch.Tensor] = {}
            for members, t in self._stacks:
                for j, (li, attr) in enumerate(members):
                    if attr in _STATE_TAGS:
                        tag = _STATE_TAGS[attr]
                        named[f"{li}.{tag}.kv"], named[f"{li}.{tag}.score"] = t[j, 0], t[j, 1]
                    else:
                        named[f"{li}.window"] = t[j]
            for names, sizes, flat in self._growing:
                named.update(zip(names, flat.split(sizes)))
            order = [f"{i}.{k}" for i in range(len(self.ratios))
                     for k in ("window", "entries", "keys", "cstate.kv", "cstate.score", "istate.kv", "istate.score")]
            self._tensors = {k: named[k] for k in order if k in named}
        return self._tensors


def restore_row_state(cache: KVCache, tensors: dict[str, torch.Tensor], n: int) -> None:
    """Make a one-row cache hold the state `row_state` took after n tokens (copies from any device; a pinned
    host source copies asynchronously, in stream order). Raises KeyError or RuntimeError when the tensors do
    not fit this cache (another geometry, or n beyond its length); the row is then reset."""
    restore_row_pieces(cache, [(0, tensors)], n)


def restore_row_pieces(cache: KVCache, pieces: list[tuple[int, dict[str, torch.Tensor]]], n: int) -> None:
    """`restore_row_state` from pieces [(start, tensors)], each `row_state(cache, end, start)` of a stretch
    start..end, in order and contiguous from 0 to n: every piece's compressed entries and indexer keys, the last
    piece's window and compressor states. Each stretch of pieces is one `cat`; the other copies (window rings,
    compressor states) go out together (`copy_tensors`)."""
    _check_one_row(cache, "restore_row_state")
    cache.reset()
    dests: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    try:
        for i, layer in enumerate(cache.layers):
            tensors = pieces[-1][1]
            dests.append(layer.window_rows.buf[0])
            srcs.append(tensors[f"{i}.window"])
            for rows, tag in ((layer.entry_rows, "entries"), (layer.key_rows, "keys")):
                if rows is None:
                    continue
                parts = [(start // layer.ratio, piece[f"{i}.{tag}"]) for start, piece in pieces]
                if sum(p.shape[0] for _, p in parts) != n // layer.ratio:
                    raise KeyError(f"layer {i}: the pieces hold {tag} for another length than {n} tokens")
                _add_pieces(rows.buf[0], parts, dests, srcs)
            for tag, st in (("cstate", layer.compressor_state), ("istate", layer.indexer_state)):
                if st is not None:
                    dests += [st.kv[0], st.score[0]]
                    srcs += [tensors[f"{i}.{tag}.kv"], tensors[f"{i}.{tag}.score"]]
        copy_tensors(dests, srcs, non_blocking=True)
        cache.check_room(n)
    except (KeyError, RuntimeError):
        cache.reset()
        raise
    except ValueError as e:  # (check_room: n beyond this cache's length)
        cache.reset()
        raise RuntimeError(str(e)) from None
    cache.end(n)


def _add_pieces(dest: torch.Tensor, parts: list[tuple[int, torch.Tensor]], dests: list[torch.Tensor],
                srcs: list[torch.Tensor]) -> None:
    """Write each part at its record offset of `dest`: parts that follow one another and sit on dest's device (a
    prefix cache's chain of block saves: tens of pieces for 32K tokens) in one `cat` into dest now, others queued
    as copies (dests, srcs). RuntimeError when they run past dest's end."""
    lo = hi = parts[0][0] if parts else 0
    contiguous = True
    for start, part in parts:
        contiguous = contiguous and start == hi and part.device == dest.device and part.dtype == dest.dtype
        hi = max(hi, start + part.shape[0])
    if hi > dest.shape[0]:
        raise RuntimeError(f"the pieces hold {hi} records; the row has room for {dest.shape[0]}")
    if len(parts) > 1 and contiguous:
        torch.cat([p for _, p in parts], out=dest[lo:hi])
        return
    for start, part in parts:
        if part.shape[0]:
            dests.append(dest[start: start + part.shape[0]])
            srcs.append(part)


def _copy_pieces(dest: torch.Tensor, parts: list[tuple[int, torch.Tensor]]) -> None:
    """Write each part at its record offset of `dest` (see `_add_pieces`)."""
    dests: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    _add_pieces(dest, parts, dests, srcs)
    copy_tensors(dests, srcs)


def copy_tensors(dests: list[torch.Tensor], srcs: list[torch.Tensor], non_blocking: bool = False) -> None:
    """dests[i].copy_(srcs[i]) for every i, as one `torch._foreach_copy_` per (dtypes, devices) group: on a GPU
    a few multi-tensor kernels where a restore or save of a 43-layer row would launch ~300 copies (the bytes
    written are the same)."""
    groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for d, s in zip(dests, srcs, strict=True):
        g = groups.setdefault((d.dtype, d.device, s.dtype, s.device), ([], []))
        g[0].append(d)
        g[1].append(s)
    for d, s in groups.values():
        try:
            torch._foreach_copy_(d, s, non_blocking=non_blocking)
        except (RuntimeError, NotImplementedError):  # a dtype without a multi-tensor kernel: one copy each
            for di, si in zip(d, s):                 # (all of them again: a copy repeated writes the same bytes)
                di.copy_(si, non_blocking=non_blocking)


def clone_tensors(tensors: dict[str, torch.Tensor], device: torch.device | None = None,
                  pin_memory: bool = False, non_blocking: bool = False) -> dict[str, torch.Tensor]:
    """Copies of named tensors (on `device`, by default each one's own), made by `copy_tensors`. The copies of
    one dtype on one device are pieces of one buffer allocated for them all: a row's state is ~30 tensors of 3
    dtypes, and each allocation the caching allocators cannot serve from memory they hold (a prefix cache keeps
    what it allocates) is a cudaMalloc or cudaHostAlloc of its own, which costs far more than the copy."""
    groups: dict[tuple, list[str]] = {}
    for k, v in tensors.items():
        groups.setdefault((v.dtype, v.device if device is None else device), []).append(k)
    out: dict[str, torch.Tensor] = {}
    for (dtype, dev), names in groups.items():
        sizes = [tensors[k].numel() for k in names]
        flat = torch.empty(sum(sizes), dtype=dtype, device=dev, pin_memory=pin_memory)
        for k, piece in zip(names, flat.split(sizes)):
            out[k] = piece.view(tensors[k].shape)
    out = {k: out[k] for k in tensors}
    copy_tensors(list(out.values()), list(tensors.values()), non_blocking=non_blocking)
    return out


def state_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.nbytes for t in tensors.values())
