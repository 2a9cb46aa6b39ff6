"""The training-step memory model (dsv4.train.memory.step_memory): its states are the real model's bytes, its
activations scale with the local tokens under context parallelism, its longest context is the boundary of what
fits, and its predictions lie within 10% of the peaks bench/e2e.py measured on an H200."""
import json
from pathlib import Path

import pytest
import torch

import dsv4
from dsv4.cli import main
from dsv4.train.memory import longest_context, step_memory

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def e2e_geometry() -> dsv4.ModelConfig:
    """bench/e2e.py's benchmark model (flash4)."""
    return dsv4.ModelConfig.preset("flash").replace(
        n_layers=4, compress_ratios=(4, 128, 4, 128), n_routed_experts=16, vocab_size=32768, n_hash_layers=0,
        n_mtp_layers=0)


def test_weights_are_the_built_models_bytes():
    cfg = dsv4.ModelConfig.preset("tiny")
    model = dsv4.Transformer(cfg).to_dtype(torch.bfloat16)  # V4's fp32 parameters stay fp32
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    mem = step_memory(cfg, 64, param_bytes=2, optimizer=None)
    assert mem.parts["weights"] == stored
    adam = step_memory(cfg, 64, param_bytes=2, optimizer="adamw")
    assert adam.parts["optimizer"] == 8 * sum(p.numel() for p in model.parameters())


def test_context_parallel_ranks_keep_their_share_and_gather_the_entries():
    cfg = e2e_geometry()
    one = step_memory(cfg, 32768, optimizer=None)
    four = step_memory(cfg, 4 * 32768, cp=4, shards=1, optimizer=None)
    for phase in one.phases:
        assert four.phases[phase]["kept_activations"] == one.phases[phase]["kept_activations"]  # same local tokens
    assert four.phases["loss"]["working_set"] == one.phases["loss"]["working_set"]
    # ...but each sees the entries of the whole sequence (4x as many in block 0, a CSA layer)
    assert four.phases["backward, block 0"]["working_set"] > one.phases["backward, block 0"]["working_set"]
    assert step_memory(cfg, 1 << 20, cp=8, optimizer=None).total < step_memory(cfg, 1 << 20, optimizer=None).total
    fused = step_memory(cfg, 1 << 20, cp=8, optimizer=None, fused_topk=True)
    assert fused.total < step_memory(cfg, 1 << 20, cp=8, optimizer=None).total


@pytest.mark.parametrize("gpus", [1, 8])
def test_the_longest_context_is_where_the_step_stops_fitting(gpus):
    cfg, budget = e2e_geometry(), 141e9
    n = longest_context(cfg, gpus, budget, optimizer="adamw")
    assert n > 0 and step_memory(cfg, n, cp=gpus, optimizer="adamw").total <= budget
    assert step_memory(cfg, n + 8192, cp=gpus, optimizer="adamw").total > budget


@pytest.mark.parametrize("result, name, recompute", [
    ("2026-12-01_h200_8de3410_e2e.json", "dsv4 train fwd+bwd (block recompute) (triton train)", True),
    ("2026-12-01_h200_f83a866_e2e_train.json", "dsv4 train fwd+bwd (triton train)", False),
])
def test_predictions_are_within_ten_percent_of_measured_peaks(result, name, recompute):
    """bench/e2e.py's bf16 model (fp32 where V4 keeps fp32), no optimizer; peaks in GiB (max_memory_allocated)."""
    row = next(r for r in json.loads((RESULTS / result).read_text())["results"] if r["name"] == name)
    predicted = step_memory(e2e_geometry(), row["tokens"], param_bytes=2, optimizer=None, recompute=recompute)
    assert predicted.total / 2**30 == pytest.approx(row["peak_gb"], rel=0.10)


def test_the_cli_answers(capsys):
    assert main(["info", "--preset", "small", "--train-memory", "--seq-len", "65536", "--gpus", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] == (out["peak_bytes"] <= out["gpu_bytes"]) and out["longest_context"] >= 65536
    assert main(["info", "--preset", "small", "--train-memory", "--gpus", "0"]) == 2


def test_the_list_threshold_is_the_kernels():
    pytest.importorskip("triton")
    from dsv4.ops.triton import sequence_attn
    from dsv4.train import memory
    assert memory.DENSE_WALK_PAIRS == sequence_attn.DENSE_WALK_PAIRS
