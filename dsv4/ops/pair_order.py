"""The (token, slot) pairs of a routing sorted by expert, without a sort where the routing is small.

A grouped expert GEMM wants the pairs in expert order (`order`), each pair's row in that order (`at`, the
inverse permutation) and the rows per expert. `torch.argsort` gives them with two sorts, and on a GPU each sort of
a decode step's few hundred pairs is one single-warp radix-sort kernel of ~26 us (H200, 384 int64 keys: 8 of
them were 7% of a 64-row flash4 decode step, bench/decode_kernels.py). Counting does the same in a handful of
elementwise kernels: a pair's row is the rows of the experts before its own plus the pairs of its own expert
before it, read off a running sum over an [experts, pairs] one-hot. The sum runs along the last dimension: along
the first, PyTorch's CUDA scan walks each column's pairs one after another (62 us per call for 384 pairs x 16
experts on an H100, more than the sorts it replaces), along the last it scans each row in parallel. The table grows
with pairs x experts, so large routings (prefill) keep the sort."""
from __future__ import annotations

import torch

COUNTING_MAX_CELLS = 1 << 20   # pairs x experts up to which counting replaces the sort (4 MB of int32 running sums)


def pair_order(flat: torch.Tensor, n_experts: int, counting: bool | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, at, counts) of the expert ids `flat` [P] (int64): order = flat.argsort(stable=True), at its inverse
    (at[order[i]] = i), counts [n_experts] int32 pairs per expert; all on flat's device, no host sync (CUDA
    graphs). `counting` forces the method (default: counting up to COUNTING_MAX_CELLS cells); both give the same
    integers."""
    P = flat.numel()
    if counting is None:
        counting = P * n_experts <= COUNTING_MAX_CELLS
    rows = torch.arange(P, device=flat.device)
    if counting:
        hits = (torch.arange(n_experts, device=flat.device)[:, None] == flat[None, :]).to(torch.int32)
        running = hits.cumsum(1, dtype=torch.int32)                        # [E, P]: pairs of each expert so far
        counts = running[:, -1] if P else hits.sum(1, dtype=torch.int32)
        before = counts.cumsum(0, dtype=torch.int32) - counts              # rows of the experts before each one
        at = (before[flat] + running.gather(0, flat[None, :]).squeeze(0) - 1).long()
        order = torch.empty_like(at).scatter_(0, at, rows)
        return order, at, counts
    order = flat.argsort(stable=True)
    at = torch.empty_like(order).scatter_(0, order, rows)
    counts = torch.zeros(n_experts, dtype=torch.int32, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    return order, at, counts
