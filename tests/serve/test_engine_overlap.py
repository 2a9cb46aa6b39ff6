"""The engine's overlapped decode (`overlap=True`: step t + 1 is launched from the tokens step t left on the device
before step t's results are handed out) against the synchronous engine and the single-sequence `dsv4.generate`:
every event (token, logprobs, finish reason) must be the same, whatever the arrivals, stops, cancellations and
row reuse; on the CPU the ordering logic is the one a GPU runs. Also the step trace and its summariser."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dsv4 import ModelConfig
from dsv4.generate.engine import generate
from dsv4.model import Transformer
from dsv4.serve.engine import Engine
from dsv4.serve.prefix_cache import PrefixCache
from dsv4.serve.types import SamplingParams
from conftest import random_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig.preset("tiny")).init_weights(seed=0).eval()


def prompts(model, lengths, seed=1):
    return random_prompts(model, lengths, seed)


def events(handle):
    """Every event the request got, checked to end with its one finishing event (nothing may follow it)."""
    got = list(handle._events)
    assert [e.finish_reason is not None for e in got] == [False] * (len(got) - 1) + [True]
    return [(e.token, e.logprob, e.top_logprobs, e.finish_reason) for e in got]


def tokens(handle):
    return [e.token for e in handle if e.token is not None]


def run_schedule(model, overlap, reqs, cancel_at=None, **kw):
    """Submit (prompt, params) pairs three per step, cancel request `cancel_at` (index, step) if given, run to
    idle; the engine and the handles."""
    engine = Engine(model, overlap=overlap, **kw)
    handles, step = [], 0
    for i, (p, params) in enumerate(reqs):
        handles.append(engine.submit(p, params))
        if i % 3 == 2:
            engine.step()
            step += 1
            if cancel_at and cancel_at[1] == step:
                handles[cancel_at[0]].cancel()
    engine.run_until_idle()
    return engine, handles


def test_overlap_is_off_by_default_on_the_cpu_and_with_speculative(model):
    assert Engine(model, max_batch=1, max_seq_len=32).overlap is False
    assert Engine(model, max_batch=1, max_seq_len=32, overlap=True).overlap is True
    assert Engine(model, max_batch=1, max_seq_len=32, overlap=True, speculative="mtp").overlap is False


def test_overlapped_steps_give_every_request_the_synchronous_events(model):
    ref = generate(model, prompts(model, [9]), 6)[0]
    ps = prompts(model, [1 + (7 * i) % 20 for i in range(14)])
    mix = [SamplingParams(max_tokens=1 + i % 5, temperature=0, logprobs=i % 3 if i % 2 else None,
                          stop_token_ids=(ref[2],) if i % 4 == 1 else ()) for i in range(14)]
    mix[3] = SamplingParams(max_tokens=6, temperature=0.9, top_k=40, seed=7)
    mix[8] = SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9, seed=11, logprobs=2)
    reqs = list(zip(ps, mix)) + [(prompts(model, [9])[0], SamplingParams(max_tokens=6, temperature=0))]
    kw = dict(max_batch=5, max_seq_len=96, prefill_chunk=8, step_token_budget=24, eos_token_ids=(ref[1],))
    sync_engine, sync = run_schedule(model, False, reqs, **kw)
    over_engine, over = run_schedule(model, True, reqs, **kw)
    assert [events(h) for h in over] == [events(h) for h in sync]
    # the schedule exercised what overlap changes: stops (eos / stop ids), max_tokens=1, rows handed out again
    reasons = [events(h)[-1][3] for h in sync]
    assert "stop" in reasons and "length" in reasons and sync_engine.stats()["requests_finished"] == 15
    assert tokens(over[-1]) == ref[:2]                        # stopped at the eos
    for i in (0, 2, 4):                                       # greedy requests against the single-sequence path
        n = mix[i].max_tokens
        assert tokens(over[i]) == generate(model, [ps[i]], n, prefill_chunk=8)[0][:len(tokens(over[i]))]
    assert over_engine.stats()["running"] == 0 and not over_engine._pending


def test_overlap_over_batched_decode_views(model):
    """batch_invariant off (a GPU's default): rows decode in batched views with free rows riding along, and with
    overlap a row that just ended rides once more as a live row, so views differ in shape between the two engines:
    the tokens and finish reasons must agree, the logprobs to fp32 rounding (as batched decode's do)."""
    ps = prompts(model, [1 + (5 * i) % 17 for i in range(12)])
    reqs = [(p, SamplingParams(max_tokens=2 + i % 6, temperature=0, logprobs=0)) for i, p in enumerate(ps)]
    kw = dict(max_batch=6, max_seq_len=96, prefill_chunk=8, step_token_budget=32, batch_invariant=False)
    _, sync = run_schedule(model, False, reqs, **kw)
    _, over = run_schedule(model, True, reqs, **kw)
    for got, want in zip(over, sync):
        got, want = events(got), events(want)
        assert [(t, r) for t, _, _, r in got] == [(t, r) for t, _, _, r in want]
        assert max(abs(a - b) for (_, a, _, _), (_, b, _, _) in zip(got, want)) <= 1e-5


def test_overlap_with_cancellation_and_row_reuse(model):
    ps = prompts(model, [6 + i for i in range(6)])
    reqs = [(p, SamplingParams(max_tokens=8, temperature=0)) for p in ps]
    kw = dict(max_batch=3, max_seq_len=96, prefill_chunk=4, step_token_budget=8)
    _, sync = run_schedule(model, False, reqs, cancel_at=(1, 2), **kw)
    engine, over = run_schedule(model, True, reqs, cancel_at=(1, 2), **kw)
    assert events(over[1])[-1][3] == "abort" and engine.stats()["requests_cancelled"] == 1
    for i in range(6):
        if i != 1:   # (where a cancellation lands differs: the synchronous engine handed out one step more)
            assert events(over[i]) == events(sync[i])
            assert tokens(over[i]) == generate(model, [ps[i]], 8, prefill_chunk=4)[0]


@pytest.mark.parametrize("overlap", [False, True])
def test_the_end_of_a_finished_request_is_saved_as_a_prefix(model, overlap):
    """With overlap the row ran once more after its last token, so the cache holds that token too and is saved with
    it; either way a next turn over prompt + output hits what was saved and decodes as generate() does."""
    pc = PrefixCache(model, 1 << 28, 0, block=64, verify_model=False)
    engine = Engine(model, max_batch=2, max_seq_len=96, prefix_cache=pc, overlap=overlap)
    first_prompt, more = prompts(model, [12, 3])
    first = engine.submit(first_prompt, SamplingParams(max_tokens=5, temperature=0))
    engine.run_until_idle()
    turn = first_prompt + tokens(first) + more
    second = engine.submit(turn, SamplingParams(max_tokens=4, temperature=0))
    engine.run_until_idle()
    assert second.cached_tokens == 12 + 5 - (0 if overlap else 1)
    assert tokens(second) == generate(model, [turn], 4)[0]


def test_background_thread_with_overlap(model):
    ps = prompts(model, [6, 13, 4])
    engine = Engine(model, max_batch=2, max_seq_len=96, overlap=True).start()
    try:
        hs = [engine.submit(p, SamplingParams(max_tokens=5, temperature=0)) for p in ps]
        assert [tokens(h) for h in hs] == [generate(model, [p], 5)[0] for p in ps]
    finally:
        engine.stop()


@pytest.mark.parametrize("overlap", [False, True])
def test_step_trace_accounts_for_every_step_and_token(model, tmp_path, overlap):
    path = tmp_path / "trace.jsonl"
    ps = prompts(model, [5, 30, 9, 17])
    engine = Engine(model, max_batch=2, max_seq_len=96, prefill_chunk=8, step_token_budget=16, overlap=overlap,
                    trace=str(path))
    hs = [engine.submit(p, SamplingParams(max_tokens=6, temperature=0)) for p in ps]
    engine.run_until_idle()
    engine.stop()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    header, steps = lines[0]["header"], lines[1:]
    assert header["max_batch"] == 2 and header["overlap"] is overlap
    assert len(steps) == engine.stats()["steps"]
    assert sum(s["emitted"] for s in steps) == sum(len(tokens(h)) for h in hs) == 24
    assert sum(s["finished"] for s in steps) == 4
    assert sum(s["prefill_tokens"] for s in steps) == sum(map(len, ps))
    assert sum(s["decode_rows"] for s in steps) == engine.stats()["decode_tokens"]
    assert all(s["ms"] >= s["wait_ms"] + s["deliver_ms"] - 1e-3 for s in steps)
    # the thread's CPU time outside its waits: within the step's wall time less the waits (clock granularity aside)
    assert all(0 <= s["cpu_ms"] <= s["ms"] - s["wait_ms"] + 0.5 for s in steps) and any(s["cpu_ms"] for s in steps)
    assert all((s["host_ms"] is None) == (s["decode_rows"] == 0) for s in steps)
    assert steps[-1]["running"] == 0 and steps[-1]["pending"] == 0
    assert any(s["pending"] for s in steps) == overlap     # results handed out a step late only with overlap
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "engine_trace.py"), str(path), "--json",
                          "--slowest", "3"], capture_output=True, text=True, check=True, cwd=ROOT)
    summary = json.loads(out.stdout)
    longest = sorted((s["ms"] for s in steps), reverse=True)[:3]
    assert [item["step"]["ms"] for item in summary["slowest"]] == longest
    assert all(item["before"] == (steps[item["index"] - 1] if item["index"] else None) for item in summary["slowest"])
    assert summary["steps"] == len(steps) and summary["tokens"] == 24
    assert summary["decode_steps"] + summary["prefill_steps"] + summary["mixed_steps"] == len(steps)
    assert all("cpu_ms_p50" in summary[k] and "off_cpu_ms_p50" in summary[k]
               for k in ("decode", "prefill", "mixed") if summary[k + "_steps"])
    span = 1e3 * (steps[-1]["t"] - steps[0]["t"]) + steps[-1]["ms"]
    assert abs(summary["step_ms_total"] + summary["idle_ms_total"] - span) < 0.05 * span + 1
