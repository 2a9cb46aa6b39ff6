"""The serving engine on a GPU: decode steps replayed from the bucketed CUDA graphs give the eager engine's tokens,
and under batch-invariant mode a request's tokens and logprobs do not depend on what else is running."""
from __future__ import annotations

import pytest
import torch

from conftest import engine_outputs
from dsv4 import ModelConfig
from dsv4.model import Transformer
from dsv4.serve.types import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig.preset("tiny")).init_weights(seed=0).cuda().eval()


@pytest.fixture(scope="module")
def bf16_model(model):
    """The batch-invariant kernels cover bf16 / fp16 models (ops/invariant): the bitwise tests run this one."""
    return Transformer(ModelConfig.preset("tiny")).init_weights(seed=0).to_dtype(torch.bfloat16).cuda().eval()


def pick(model, bf16_model, batch_invariant):
    return bf16_model if batch_invariant else model


def run(model, ps, params, **kw):
    return engine_outputs(model, ps, params, max_batch=8, **kw)


def prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2048, (3 + (11 * i) % 40,), generator=g).tolist() for i in range(n)]


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_graph_decode_equals_eager_decode(model, bf16_model, batch_invariant):
    """A graph replays its bucket's padded batch, eager decode the live rows: with the default kernels the GEMM
    shapes differ, so tokens must agree and logprobs to fp32 rounding; under batch invariance, bitwise."""
    ps, params = prompts(12), SamplingParams(max_tokens=12, temperature=0, logprobs=0)
    model = pick(model, bf16_model, batch_invariant)
    graphs, with_graphs = run(model, ps, params, cuda_graphs=True, batch_invariant=batch_invariant)
    assert graphs._graphs, "no decode step replayed a CUDA graph"
    _, eager = run(model, ps, params, cuda_graphs=False, batch_invariant=batch_invariant)
    if batch_invariant:
        assert with_graphs == eager
    for got, ref in zip(with_graphs, eager):
        assert [t for t, _ in got] == [t for t, _ in ref]
        assert max(abs(a - b) for (_, a), (_, b) in zip(got, ref)) < 1e-4


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_batch_invariant_requests_equal_the_request_alone(bf16_model, cuda_graphs):
    model = bf16_model
    ps, params = prompts(12), SamplingParams(max_tokens=10, temperature=0, logprobs=0)
    _, together = run(model, ps, params, cuda_graphs=cuda_graphs, batch_invariant=True)
    for p, got in zip(ps, together):
        assert got == run(model, [p], params, cuda_graphs=cuda_graphs, batch_invariant=True)[1][0]


def test_seeded_sampling_is_reproducible_on_the_gpu(model):
    ps = prompts(6)
    params = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    _, together = run(model, ps, params)
    assert together[3] == run(model, [ps[3]], params)[1][0]


def test_batched_prefill_gives_each_request_its_tokens(model):
    """batch_invariant off: prompts prefilled several per forward (and decoded batched) get the tokens they get
    alone, logprobs equal to fp32 rounding."""
    ps, params = prompts(12), SamplingParams(max_tokens=10, temperature=0, logprobs=0)
    engine, together = run(model, ps, params, batch_invariant=False)
    assert engine.batched_prefill
    for p, got in zip(ps, together):
        alone = run(model, [p], params, batch_invariant=False)[1][0]
        assert [t for t, _ in got] == [t for t, _ in alone]
        assert max(abs(a - b) for (_, a), (_, b) in zip(got, alone)) < 1e-4


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_overlapped_decode_gives_the_synchronous_tokens(model, bf16_model, batch_invariant):
    """overlap (the GPU default: step t + 1 launched from the device's tokens before step t is handed out) against
    the synchronous engine, graphs on, requests of several lengths so rows end and are handed out again: under
    batch invariance every event is the same; otherwise the tokens, and the logprobs to fp32 rounding."""
    ps = prompts(16)
    params = SamplingParams(max_tokens=9, temperature=0, logprobs=0)
    model = pick(model, bf16_model, batch_invariant)
    over_engine, over = run(model, ps, params, overlap=True, batch_invariant=batch_invariant)
    assert over_engine.overlap and over_engine._graphs
    _, sync = run(model, ps, params, overlap=False, batch_invariant=batch_invariant)
    if batch_invariant:
        assert over == sync
    for got, ref in zip(over, sync):
        assert [t for t, _ in got] == [t for t, _ in ref]
        assert max(abs(a - b) for (_, a), (_, b) in zip(got, ref)) < 1e-4
    sampled = SamplingParams(max_tokens=9, temperature=0.8, top_k=20, seed=3)
    assert run(model, ps[:6], sampled, overlap=True)[1] == run(model, ps[:6], sampled, overlap=False)[1]


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_warm_up_captures_every_bucket_and_changes_no_output(model, speculative):
    """After `warm_up` every decode bucket's graph (speculative: the fused greedy verify, or for bucket 1 the
    single greedy row's whole step, and the sampled verify) is captured, and requests get what a cold engine,
    capturing as it goes, gives them (bitwise: batch-invariant)."""
    from dsv4.serve.engine import Engine
    kw = dict(max_batch=8, max_seq_len=128, prefill_chunk=16, step_token_budget=64, batch_invariant=True,
              speculative=speculative)
    warm = Engine(model, **kw)
    assert warm.warm_up() > 0
    buckets = set(warm.graph_buckets)
    if speculative is None:
        assert set(warm._graphs) == buckets and all(g.graph is not None for g in warm._graphs.values())
    else:
        rows = [key for key, v in warm.spec._row_steps.items() if key[2] and v[1].graph is not None]
        assert [key[0] for key in rows] == [0]      # (one stream: row 0, bucket 1)
        assert {key[2] for key in warm.spec._fused_graphs} | {1} == buckets
        assert {b for b, _ in warm._spec_graphs} == buckets
    assert warm.stats()["steps"] == 0 and warm.cache.lengths() == [0] * 8
    outs = []
    for engine in (warm, Engine(model, **kw)):
        params = [SamplingParams(max_tokens=9, temperature=0, logprobs=0),
                  SamplingParams(max_tokens=7, temperature=0.9, seed=4, logprobs=0)]
        hs = [engine.submit(p, params[i % 2]) for i, p in enumerate(prompts(6))]
        engine.run_until_idle()
        outs.append([[(e.token, e.logprob) for e in h] for h in hs])
    assert outs[0] == outs[1]
