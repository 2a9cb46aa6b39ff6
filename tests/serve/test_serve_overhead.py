"""bench/serve.py's load split over client processes, and bench/serve_overhead.py's clock engine (the real
RequestHandle behind a fixed step time)."""
from __future__ import annotations

import os
import sys
import time

import pytest

pytest.importorskip("openai")
BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
sys.path.insert(0, os.path.abspath(BENCH))

from http_server import ServerThread  # noqa: E402
from scripted_engine import ScriptedEngine  # noqa: E402

from dsv4.serve.api import build_app  # noqa: E402
from dsv4.serve.types import SamplingParams  # noqa: E402
from dsv4.train.tokenizer import train_bpe  # noqa: E402


def test_load_split_over_client_processes_counts_every_request(tmp_path):
    import serve as bench   # bench/serve.py as a top-level module, so the spawned processes can import it
    tok = train_bpe(["Hello there, how are you?\n"] * 20, 300, tmp_path)
    engine = ScriptedEngine(lambda prompt: tok.encode("Hello there, how are you? Hello there"), max_seq_len=4096,
                            delay=0.001)
    server = ServerThread(build_app(engine, tok, "m")).start()
    try:
        lvl = bench.run_level_procs(server.url, "m", procs=2, concurrency=4, prompt_len=16, max_tokens=5,
                                    n_requests=6, duration_limit=60, source=bench.PromptSource(tok.vocab_size),
                                    seed=0, timeout=30)
    finally:
        server.stop()
    assert lvl["client_procs"] == 2 and lvl["client_cpu_s"] > 0
    assert (lvl["requests"], lvl["ok"], lvl["errors"]) == (6, 6, 0)
    assert lvl["output_tokens"] == 30 and lvl["short_outputs"] == 0 and lvl["no_usage"] == 0
    assert len(engine.submitted) == 6 and sorted(h.prompt_tokens for h in engine.submitted) == [16] * 6
    assert 0 < lvl["wall_s"] < 30 and lvl["output_tok_per_s"] == pytest.approx(30 / lvl["wall_s"], rel=1e-2)


def test_clock_engine_runs_max_batch_rows_and_queues_the_rest():
    from serve_overhead import ClockEngine
    engine = ClockEngine([7, 8, 9], max_batch=2, step_s=0.002, gil_releases=1).start()
    try:
        handles = [engine.submit([1, 2, 3], SamplingParams(max_tokens=4)) for _ in range(3)]
        late = engine.submit([1], SamplingParams(max_tokens=50))
        got = [list(h) for h in handles]
        late.cancel()
        tail = list(late)
    finally:
        engine.stop()
    for events in got:
        assert [e.token for e in events] == [8, 9, 7, 8]          # tokens[n % 3] for n = 1..4
        assert [e.finish_reason for e in events] == [None, None, None, "length"]
    assert tail[-1].finish_reason == "abort" and len(tail) < 50
    assert engine.emitted == 12 + len(tail) - 1
    # two rows at a time: the third request's four tokens come after the first two's, so >= 8 steps ran
    assert engine.steps >= 8


def test_clock_engine_keeps_its_step_time():
    from serve_overhead import ClockEngine
    engine = ClockEngine([5], max_batch=1, step_s=0.005, gil_releases=2).start()
    try:
        t0 = time.perf_counter()
        events = list(engine.submit([1], SamplingParams(max_tokens=40)))
        took = time.perf_counter() - t0
    finally:
        engine.stop()
    assert len(events) == 40
    assert 40 * 0.005 * 0.8 < took < 40 * 0.005 * 3
