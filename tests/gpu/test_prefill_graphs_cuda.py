"""Short prompt chunks on a GPU (dsv4.serve.prefill_graphs): the captured padded step replays the eager padded
step bit for bit (logits and the row's state), a hit through it equals a cold prompt through it, and an eager
prefill chunk whose ids come from the host never waits for the device."""
from __future__ import annotations

import pytest
import torch

from dsv4 import ModelConfig
from dsv4.cache.row_state import row_state
from dsv4.model import Transformer
from dsv4.serve.engine import Engine
from dsv4.serve.prefill_graphs import PrefillGraphs
from dsv4.serve.prefix_cache import PrefixCache
from dsv4.serve.types import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig.preset("tiny")).init_weights(seed=0).to_dtype(torch.bfloat16).cuda().eval()


def ids(n, seed=0):
    return torch.randint(2, 2048, (n,), generator=torch.Generator().manual_seed(seed))


def test_replayed_padded_chunks_equal_the_eager_padded_chunks(model):
    x = ids(200)
    caches = [model.new_cache(2, 256) for _ in range(2)]
    graphs = [PrefillGraphs(model, c, 32, cuda_graphs=g) for c, g in zip(caches, (True, False))]
    with torch.no_grad():
        for c in caches:
            model(x[None, :40].expand(2, -1).contiguous().cuda(), cache=c)
        at = 40
        for n in (7, 13, 5, 9, 16, 3):   # bucket 16: one eager call, then a capture, then replays
            got, want = (g.run(1, x[at:at + n].numpy()) for g in graphs)
            at += n
            assert torch.equal(got, want)
            assert caches[0].lengths() == caches[1].lengths() == [40, at]
            a, b = row_state(caches[0].select(1), at), row_state(caches[1].select(1), at)
            assert all(torch.equal(a[k], b[k]) for k in a)
    assert graphs[0].counters["captures"] == 1 and graphs[0].counters["replays"] >= 4


@pytest.mark.parametrize("overlap", [False, True])
def test_hits_equal_cold_requests_through_graphed_chunks(model, overlap):
    # blocks of 64: every prompt below stops at 576 (9 blocks) and its last chunk (19, 23, the repeat whole, 28,
    # 14 tokens) is a padded step: bucket 32 runs eagerly once, is captured on its second call, then replayed
    base = ids(590, 1).tolist()
    reqs = [base + ids(n, 2 + n).tolist() for n in (5, 9, 9, 14)] + [base]

    def engine():
        pc = PrefixCache(model, 1 << 28, 0, block=64, verify_model=False)
        return Engine(model, max_batch=2, max_seq_len=1024, prefill_chunk=256, overlap=overlap, prefix_cache=pc,
                      prefill_graphs=32, batch_invariant=False)
    warm = engine()
    for p in reqs:
        params = SamplingParams(max_tokens=4, temperature=0, logprobs=2)
        cold = engine()
        got, want = warm.submit(p, params), cold.submit(p, params)
        warm.run_until_idle()
        cold.run_until_idle()
        assert [(e.token, e.logprob, e.top_logprobs) for e in got._events] == \
            [(e.token, e.logprob, e.top_logprobs) for e in want._events]
    assert warm.stats()["prefix_hit_tokens"] == 576 + 599 + 576 + 576
    assert warm.prefill_graphs.counters["chunks"] == 4 and warm.prefill_graphs.counters["replays"] >= 1


def test_an_eager_prefill_chunk_with_host_ids_never_waits_for_the_device(model):
    x = ids(300, 3)
    cache = model.new_cache(1, 512)
    with torch.no_grad():
        model(x[None, :256].cuda(), cache=cache)
        model(x[None, 256:272], cache=cache, last_only=True)    # (kernels compiled for this shape)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x[None, 272:288], cache=cache, last_only=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
