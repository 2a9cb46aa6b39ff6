"""Values that every layer of one forward step computes alike from the rows' start positions (positions, RoPE
angles, window slots, index lists, compressor group numbers). A cached step's `pos0` tensor is made once per
step (KVCache.begin), so it carries the memo (as does any tensor memoised from it, e.g. the compressors' group
numbers): a decode step would otherwise spend ~150 of its ~800 kernels recomputing the same tiny tensors in
every layer. Consumers must not modify what they get. It sits in cache/, below model/: the cache makes pos0 and
reads the memo as the model's layers do. `constant` memoises what no step's data changes, across steps."""
from __future__ import annotations

from typing import Callable, Hashable, TypeVar

import torch

T = TypeVar("T")


def shared(owner: torch.Tensor, key: Hashable, make: Callable[[], T]) -> T:
    """make(), computed once per per-step tensor `owner` (pos0, or a tensor memoised from it) and key."""
    memo = owner.__dict__.setdefault("_dsv4_step_memo", {})
    if key not in memo:
        memo[key] = make()
    return memo[key]


def constant(memo: dict | None, key: Hashable, make: Callable[[], T]) -> T:
    """make(), memoised in `memo` (a dict kept across steps; None: made each time), for values that do not depend
    on any step's data (index offsets). Not kept while a CUDA graph is being captured: a captured op's output
    holds nothing until the graph replays, so an eager step reading it before then would read garbage."""
    if memo is None:
        return make()
    if key not in memo:
        value = make()
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return value
        memo[key] = value
    return memo[key]
