"""bench/spec_step_count.py: the speculative step's op counts, per phase; `ops_as_kernels` counts each dsv4.ops call
once (its CPU reference's aten ops not at all) and leaves the dispatch as it found it."""
import os
import sys

import torch

import dsv4
from dsv4.serve.engine import Engine
from dsv4.serve.types import SamplingParams

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
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
