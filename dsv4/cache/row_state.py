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

__all__ = ["row_state", "restore_row_state", "restore_row_pieces", "state_nbytes", "GROWING"]

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


def restore_row_state(cache: KVCache, tensors: dict[str, torch.Tensor], n: int) -> None:
    """Make a one-row cache hold the state `row_state` took after n tokens (copies from any device; a pinned
    host source copies asynchronously, in stream order). Raises KeyError or RuntimeError when the tensors do
    not fit this cache (another geometry, or n beyond its length); the row is then reset."""
    restore_row_pieces(cache, [(0, tensors)], n)


def restore_row_pieces(cache: KVCache, pieces: list[tuple[int, dict[str, torch.Tensor]]], n: int) -> None:
    """`restore_row_state` from pieces [(start, tensors)], each `row_state(cache, end, start)` of a stretch
    start..end, in order and contiguous from 0 to n: every piece's compressed entries and indexer keys, the last
    piece's window and compressor states."""
    _check_one_row(cache, "restore_row_state")
    cache.reset()
    try:
        for i, layer in enumerate(cache.layers):
            tensors = pieces[-1][1]
            layer.window_rows.buf[0].copy_(tensors[f"{i}.window"], non_blocking=True)
            for rows, tag in ((layer.entry_rows, "entries"), (layer.key_rows, "keys")):
                if rows is None:
                    continue
                _copy_pieces(rows.buf[0], [(start // layer.ratio, piece[f"{i}.{tag}"]) for start, piece in pieces])
                if sum(p[f"{i}.{tag}"].shape[0] for _, p in pieces) != n // layer.ratio:
                    raise KeyError(f"layer {i}: the pieces hold {tag} for another length than {n} tokens")
            for tag, st in (("cstate", layer.compressor_state), ("istate", layer.indexer_state)):
                if st is not None:
                    st.kv[0].copy_(tensors[f"{i}.{tag}.kv"], non_blocking=True)
                    st.score[0].copy_(tensors[f"{i}.{tag}.score"], non_blocking=True)
        cache.check_room(n)
    except (KeyError, RuntimeError):
        cache.reset()
        raise
    except ValueError as e:  # (check_room: n beyond this cache's length)
        cache.reset()
        raise RuntimeError(str(e)) from None
    cache.end(n)


def _copy_pieces(dest: torch.Tensor, parts: list[tuple[int, torch.Tensor]]) -> None:
    """Write each part at its record offset of `dest`. Parts that follow one another and sit on dest's device
    (a prefix cache's chain of block saves: a hundred pieces for 32K tokens) go in one `cat` into dest, one kernel
    rather than one copy each; the bytes written are the same."""
    lo = hi = parts[0][0] if parts else 0
    contiguous = True
    for start, part in parts:
        contiguous = contiguous and start == hi and part.device == dest.device and part.dtype == dest.dtype
        hi = start + part.shape[0]
    if len(parts) > 1 and contiguous:
        if hi > dest.shape[0]:
            raise RuntimeError(f"the pieces hold {hi} records; the row has room for {dest.shape[0]}")
        torch.cat([p for _, p in parts], out=dest[lo:hi])
        return
    for start, part in parts:
        dest[start: start + part.shape[0]].copy_(part, non_blocking=True)


def state_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.nbytes for t in tensors.values())
