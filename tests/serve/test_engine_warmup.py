"""`Engine.warm_up` runs synthetic requests through the engine before serving (compiles and graph captures off the
first requests' steps) and must leave nothing behind: the requests served afterwards get, bitwise, the events a
cold engine gives them, and the counters, the prefix cache, the rows and the trace are those of a new engine."""
from __future__ import annotations

import json

import pytest

from dsv4 import ModelConfig
from dsv4.model import Transformer
from dsv4.serve.engine import Engine
from dsv4.serve.prefix_cache import PrefixCache
from dsv4.serve.rows import Phase
from dsv4.serve.types import SamplingParams
from conftest import random_prompts


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig.preset("tiny")).init_weights(seed=0).eval()


def prompts(model, lengths, seed=3):
    return random_prompts(model, lengths, seed)


def events(handle):
    return [(e.token, e.logprob, e.top_logprobs, e.finish_reason) for e in handle._events]


def serve(engine, reqs):
    """Submit (prompt, params) two per step, run to idle; every request's events."""
    handles = []
    for i, (p, params) in enumerate(reqs):
        handles.append(engine.submit(p, params))
        if i % 2:
            engine.step()
    engine.run_until_idle()
    return [events(h) for h in handles]


def workload(model):
    ps = prompts(model, [3, 12, 7, 17])
    params = [SamplingParams(max_tokens=4, temperature=0, logprobs=2),
              SamplingParams(max_tokens=3, temperature=0.8, top_k=20, seed=5),
              SamplingParams(max_tokens=4, temperature=0),
              SamplingParams(max_tokens=3, temperature=1.0, top_p=0.9, seed=9, logprobs=0)]
    return list(zip(ps, params))


def fresh_counters(engine):
    return {k: v for k, v in engine.stats().items() if k != "max_batch"}


@pytest.mark.parametrize("overlap,batch_invariant", [(False, True), (True, True), (True, False)])
def test_warmed_engine_serves_what_a_cold_engine_serves(model, tmp_path, overlap, batch_invariant):
    kw = dict(max_batch=4, max_seq_len=64, prefill_chunk=8, step_token_budget=20, max_prefill_rows=3,
              overlap=overlap, batch_invariant=batch_invariant)
    cold = Engine(model, prefix_cache=PrefixCache(model, 1 << 26, 0, block=4, verify_model=False), **kw)
    pc = PrefixCache(model, 1 << 26, 0, block=4, verify_model=False)
    trace = tmp_path / "trace.jsonl"
    warm = Engine(model, prefix_cache=pc, trace=str(trace), **kw)
    before = fresh_counters(warm)
    # groups: one row, three rows batched (two chunks each with budget 20), one prompt of two chunks
    seconds = warm.warm_up([(1, 5), (3, 11, 3), (1, 13, 3, 1.0)])
    assert seconds > 0
    assert fresh_counters(warm) == before and all(v == 0 for v in before.values())
    stats = pc.stats()
    assert stats["saves"] == stats["lookups"] == 0 and stats["entries"] == {"device": 0, "host": 0}
    assert warm.pool.phase == [Phase.FREE] * 4 and warm.cache.lengths() == [0] * 4 and not warm._pending
    assert warm._next.eq(0).all()
    warm.stop()
    assert len(trace.read_text().splitlines()) == 1   # the header alone: warm-up steps are not traced
    reqs = workload(model)
    got, want = serve(warm, reqs), serve(cold, reqs)
    assert got == want
    # a second turn hits the end-of-request save in both engines and still matches
    turn2 = [(reqs[2][0] + [t for t, *_ in want[2] if t is not None] + [1, 2], SamplingParams(max_tokens=4,
                                                                                             temperature=0))]
    assert serve(warm, turn2) == serve(cold, turn2)
    assert warm.stats()["prefix_hit_tokens"] == cold.stats()["prefix_hit_tokens"] > 0
    assert warm.stats() == cold.stats()


def test_default_warm_up_on_the_cpu_is_cheap_and_leaves_the_engine_new(model):
    engine = Engine(model, max_batch=2, max_seq_len=32)
    assert engine.warm_up() < 1.0
    assert engine.stats()["steps"] == 0 and engine.cache.lengths() == [0, 0]
    h = engine.submit(prompts(model, [6])[0], SamplingParams(max_tokens=3, temperature=0))
    engine.run_until_idle()
    assert h.id == "req-0" and len([e for e in h._events if e.token is not None]) == 3


def test_warm_up_of_a_speculative_engine(model):
    kw = dict(max_batch=2, max_seq_len=48, prefill_chunk=8, speculative="mtp", n_draft=2)
    warm, cold = Engine(model, **kw), Engine(model, **kw)
    warm.warm_up([(2, 9, 6), (1, 5, 4, 1.0)])
    assert warm.spec.stats == cold.spec.stats and not warm.spec.rows
    assert warm.spec.mtp_cache.lengths() == [0, 0] and fresh_counters(warm) == fresh_counters(cold)
    reqs = workload(model)
    assert serve(warm, reqs) == serve(cold, reqs)


def test_warm_up_needs_an_idle_engine(model):
    engine = Engine(model, max_batch=2, max_seq_len=32)
    engine.submit([1, 2, 3], SamplingParams(max_tokens=2, temperature=0))
    with pytest.raises(RuntimeError, match="idle"):
        engine.warm_up()
    engine.run_until_idle()
    engine.warm_up()
