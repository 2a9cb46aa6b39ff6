"""bench/spec_step_count.py's device side on a GPU (skipped without CUDA): the profiler sees the kernels replayed
from CUDA graphs (a step's count is the graph's hundreds, not the dozen eager ones around it), a graph replayed
alone costs no more than a whole step, and a step's host time and waits add up to its wall time."""
from __future__ import annotations

import os
import sys

import pytest
import torch

import dsv4
from dsv4.serve.engine import Engine
from dsv4.serve.types import SamplingParams

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import spec_step_count  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("speculative", [None, "mtp"])
@torch.no_grad()
def test_profile_sees_graph_kernels_and_times_add_up(speculative):
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=0).cuda().eval()
    engine = Engine(model, max_batch=1, max_seq_len=256, prefill_chunk=16, speculative=speculative)
    engine.submit(list(range(3, 19)), SamplingParams(max_tokens=150, temperature=0, ignore_eos=True))
    spec_step_count.time_steps(engine, 8)                      # prefill, warm-up, capture
    timed = spec_step_count.time_steps(engine, 20)
    gpu = spec_step_count.gpu_profile(engine, 5)
    replays = spec_step_count.replay_times(engine, 5)
    # the wall time less the final drain (at most one step's device work, over 20 steps)
    assert 0 < timed["host_ms_per_step"]
    host_and_waits = timed["host_ms_per_step"] + timed["wait_ms_per_step"]
    assert 0.8 * timed["ms_per_step"] <= host_and_waits <= timed["ms_per_step"] + 0.01
    # the tiny forward launches ~190 dsv4.ops / aten kernels (--ops-as-kernels on a CPU), all inside its graph
    assert gpu["kernels_per_step"] > 100
    assert 0 < gpu["busy_ms_per_step"] <= gpu["span_ms_per_step"] + 1e-3
    assert gpu["busy_ms_per_step"] <= gpu["kernel_ms_per_step"] + 1e-3
    assert replays is not None and 0 < replays["graphs_ms_per_step"] <= timed["ms_per_step"]
