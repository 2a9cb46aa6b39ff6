"""The counting pair order on a GPU: the stable argsort's integers, without a host sync, inside a CUDA graph."""
from __future__ import annotations

import pytest
import torch

from dsv4.ops.pair_order import pair_order

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("pairs,experts", [(384, 16), (6, 256), (64 * 8, 256), (4096, 16)])
def test_counting_equals_the_stable_argsort_on_the_gpu(pairs, experts):
    flat = torch.randint(0, experts, (pairs,), device="cuda", generator=torch.Generator("cuda").manual_seed(pairs))
    order, at, counts = pair_order(flat, experts, counting=True)
    assert torch.equal(order, flat.argsort(stable=True))
    assert torch.equal(at[order], torch.arange(pairs, device="cuda"))
    assert torch.equal(counts.long(), torch.bincount(flat, minlength=experts))


def test_counting_runs_without_a_sync_and_replays_in_a_graph():
    flat = torch.randint(0, 16, (384,), device="cuda")
    pair_order(flat, 16)   # (warm: allocations and kernels loaded)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pair_order(flat, 16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static = flat.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pair_order(static, 16)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        order, at, counts = pair_order(static, 16)
    new = torch.randint(0, 16, (384,), device="cuda")
    static.copy_(new)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(order, new.argsort(stable=True)) and torch.equal(counts.long(), torch.bincount(new, minlength=16))
