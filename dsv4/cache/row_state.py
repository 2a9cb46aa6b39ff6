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

__all__ = ["row_state", "restore_row_state", "state_nbytes"]


def _check_one_row(cache: KVCache, what: str) -> None:
    if cache.batch_size != 1:
        raise ValueError(f"{what} needs a one-row cache (use cache.select(row)), got {cache.batch_size} rows")


def row_state(cache: KVCache, n: int) -> dict[str, torch.Tensor]:
    """Views (no copy) of the state of a one-row cache that holds exactly n tokens. A row a failed step left
    half-written raises CacheDamaged: it must never be stored."""
    _check_one_row(cache, "row_state")
    if cache.lengths() != [n]:
        raise ValueError(f"the row holds {cache.lengths()[0]} tokens, not the {n} to be stored")
    cache.check_intact()
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(cache.layers):
        out[f"{i}.window"] = layer.window_rows.buf[0]
        if layer.entry_rows is not None:
            out[f"{i}.entries"] = layer.entry_rows.buf[0, : n // layer.ratio]
        if layer.key_rows is not None:
            out[f"{i}.keys"] = layer.key_rows.buf[0, : n // layer.ratio]
        for tag, st in (("cstate", layer.compressor_state), ("istate", layer.indexer_state)):
            if st is not None:
                out[f"{i}.{tag}.kv"], out[f"{i}.{tag}.score"] = st.kv[0], st.score[0]
    return {k: v.detach() for k, v in out.items()}


def restore_row_state(cache: KVCache, tensors: dict[str, torch.Tensor], n: int) -> None:
    """Make a one-row cache hold the state `row_state` took after n tokens (copies from any device; a pinned
    host source copies asynchronously, in stream order). Raises KeyError or RuntimeError when the tensors do
    not fit this cache (another geometry, or n beyond its length); the row is then reset."""
    _check_one_row(cache, "restore_row_state")
    cache.reset()
    try:
        for i, layer in enumerate(cache.layers):
            layer.window_rows.buf[0].copy_(tensors[f"{i}.window"], non_blocking=True)
            if layer.entry_rows is not None:
                layer.entry_rows.buf[0, : n // layer.ratio].copy_(tensors[f"{i}.entries"], non_blocking=True)
            if layer.key_rows is not None:
                layer.key_rows.buf[0, : n // layer.ratio].copy_(tensors[f"{i}.keys"], non_blocking=True)
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


def state_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.nbytes for t in tensors.values())
