"""bench/spec_step_count.py: the speculative step's op counts, per phase; `ops_as_kernels` counts each dsv4.ops call
once (its CPU reference's aten ops not at all) and leaves the dispatch as it found it. The timing's host part (wall
time less the device waits) and the device profile's summary."""
import os
import sys
import time

import pytest
import torch

import dsv4
from dsv4.serve.engine import Engine
from dsv4.serve.types import SamplingParams

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import graph_stub  # noqa: E402
import spec_step_count  # noqa: E402


def _engine(model) -> Engine:
    engine = Engine(model, max_batch=1, max_seq_len=64, prefill_chunk=12, speculative="mtp", n_draft=1)
    engine.submit(list(range(3, 15)), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    engine.step()
    engine.step()
    return engine


@torch.no_grad()
def test_counts_per_phase_and_ops_as_kernels():
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=0).eval()
    pick = spec_step_count.ops_api._pick
    aten = spec_step_count.count_steps(_engine(model), 1)["per_step"]
    kernels = spec_step_count.count_steps(_engine(model), 1, ops_as_kernels=True)["per_step"]
    assert spec_step_count.ops_api._pick is pick
    for phase in ("checkpoint", "rollback", "verify_forward"):
        assert 0 < kernels[f"aten_ops:{phase}"] <= aten[f"aten_ops:{phase}"]
    # the verify forward's references (compressor steps, attention, norms ...) are many aten ops, one op each here
    assert kernels["aten_ops:verify_forward"] < aten["aten_ops:verify_forward"] / 2
    # the cache bookkeeping runs no dsv4.ops: the same count either way
    assert kernels["aten_ops:checkpoint"] == aten["aten_ops:checkpoint"]
    assert kernels["aten_ops:rollback"] == aten["aten_ops:rollback"]


def test_device_summary_sums_kernels_and_merges_busy_intervals():
    # two steps' kernels, b and c overlapping (another stream): the sum counts both, the busy time their union
    spans = [("b", 100.0, 120.0), ("a", 0.0, 10.0), ("c", 115.0, 125.0), ("a", 200.0, 215.0)]
    out = spec_step_count.device_summary(spans, steps=2)
    grid = sorted({t for _, s, e in spans for t in range(int(s), int(e))})   # the busy microseconds, by brute force
    assert out["kernel_ms_per_step"] == round((10 + 20 + 10 + 15) / 1e3 / 2, 4)
    assert out["busy_ms_per_step"] == round(len(grid) / 1e3 / 2, 4)
    assert len(grid) == 10 + 25 + 15 and out["span_ms_per_step"] == round(215 / 1e3 / 2, 4)
    assert out["kernels_per_step"] == 2.0
    assert [name for name, _, _ in out["top"]] == ["a", "b", "c"]            # by summed time: 25, 20, 10
    assert out["top"][0] == ["a", round(25 / 1e3 / 2, 4), 1.0]
    assert spec_step_count.device_summary([], steps=3)["busy_ms_per_step"] == 0.0


@torch.no_grad()
def test_time_steps_host_time_excludes_the_device_waits(monkeypatch):
    """On a CPU, the engine's graph path with no-op replays (bench/graph_stub.py): each step's results wait
    (HostCopy.wait, slowed here by 20 ms) and the host time is the wall time less those waits."""
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=0).eval()
    real = spec_step_count.host_module.HostCopy.wait

    def slow(copy):
        time.sleep(0.02)
        return real(copy)
    with graph_stub.stubbed_graphs():
        engine = graph_stub.graph_path(Engine(model, max_batch=1, max_seq_len=64, prefill_chunk=12, overlap=True))
        engine.submit(list(range(3, 15)), SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        spec_step_count.time_steps(engine, 5)       # prefill, warm-up calls, the stub's capture
        graph = engine._graphs[1]
        assert isinstance(graph, graph_stub.StubGraphDecoder) and graph.graph is not None
        lengths = engine.cache.lengths()
        monkeypatch.setattr(spec_step_count.host_module.HostCopy, "wait", slow)
        out = spec_step_count.time_steps(engine, 4)
    assert engine.cache.lengths() == [lengths[0] + 4]     # the host bookkeeping of 4 replayed steps ran
    assert out["steps"] == 4 and out["wait_ms_per_step"] >= 20
    assert 0 < out["host_ms_per_step"] < out["ms_per_step"] - 20
    assert abs(out["host_ms_per_step"] + out["wait_ms_per_step"] - out["ms_per_step"]) < 0.5
    assert spec_step_count.gpu_profile(engine, 2) is None   # (the device profile is a GPU's alone)


@pytest.mark.parametrize("n_draft", [1, 3])
@torch.no_grad()
def test_graph_path_counts_one_replay_for_a_single_greedy_row(n_draft):
    """Counted on the stubbed graph path (every graph captured), a single greedy row's speculative step (any
    n_draft) replays one graph with one op around it (its staged inputs' copy) and one transfer; the engine's held
    stream (a lone greedy row) replays it with the copies of its results the next replay would overwrite around it
    (the logits; on this CPU the packed results too, which a GPU copies to the host as they are made) and one wait,
    its inputs carried on the device; without the single-row step a step replays 1 + n_draft graphs (MTP catch-up,
    further drafts, fused verify) with eager ops around them."""
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=0).eval()
    counts = {}
    for mode in ("row", "stream", "no_row"):
        with graph_stub.stubbed_graphs():
            engine = graph_stub.graph_path(Engine(model, max_batch=1, max_seq_len=64, prefill_chunk=12,
                                                  speculative="mtp", n_draft=n_draft))
            engine.spec.fuse_row = mode != "no_row"
            if mode == "row":   # (the step-by-step path)
                engine._streamable = lambda: None
            engine.submit(list(range(3, 15)), SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
            for _ in range(6):   # the prefill, then each graph's 2 eager calls and its capture
                engine.step()
            assert (engine._stream is not None) == (mode != "row")
            counts[mode] = spec_step_count.count_steps(engine, 3, breakdown=True, graphed=True)
    row, stream, no_row = (counts[m]["per_step"] for m in ("row", "stream", "no_row"))
    assert row["replays"] == 1 and row["eager_on_gpu"] == 1
    assert [k for k in row if k.startswith("sync:")] == ["sync:to_host"]
    assert row["sync:to_host"] == 1
    assert stream["replays"] == 1 and stream["eager_on_gpu"] == 2
    assert {op for ops in counts["stream"]["breakdown"].values() for op in ops} == {"clone"}
    assert counts["stream"]["syncs_per_step"] == 1
    assert no_row["replays"] == 1 + n_draft and no_row["eager_on_gpu"] > 10


@torch.no_grad()
def test_time_row_stream_times_the_loop_and_the_stream():
    """`--pipelined`'s timing of a lone greedy row (CPU: eager steps, no profile): both modes time the steps asked
    for, each step emitting 1 .. n_draft + 1 tokens, the host's part within the wall time."""
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=0).eval()
    out = spec_step_count.time_row_stream(model, list(range(3, 23)), 2, 3)
    assert set(out) == {"row_loop", "row_stream"}
    for timed in (v["timed"] for v in out.values()):
        assert timed["steps"] == 3 and 1 <= timed["tokens_per_step"] <= 3
        assert 0 < timed["host_ms_per_step"] <= timed["ms_per_step"] + 1e-3
