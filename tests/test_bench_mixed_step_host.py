"""bench/mixed_step_host.py: the mixed step it sets up is the one it means (R requests end in it, R prompts prefill
in one forward, each part's calls are one per row), its parts add up to the step, and it leaves the model as it
found it. The forward's op count does not grow with the rows (no per-row loop in a batched prefill forward)."""
import os
import sys

import pytest

import dsv4

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import mixed_step_host as bench  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return dsv4.Transformer(bench.tiny_flash4()).init_weights(seed=0).eval()


def test_the_model_has_flash4s_structure_at_tiny_dims():
    cfg = bench.tiny_flash4()
    assert cfg.n_layers == 4 and cfg.compress_ratios == (4, 128, 4, 128) and cfg.window_size == 128
    assert (cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_hash_layers, cfg.n_mtp_layers) == (16, 6, 0, 0)
    assert cfg.dim == dsv4.ModelConfig.preset("tiny").dim


def test_forward_ops_do_not_grow_with_rows(model):
    recs = [bench.measure_forward(model, rows, 16 // rows, repeats=1) for rows in (1, 4)]
    assert recs[0]["ops"] == recs[1]["ops"] > 0 and recs[0]["aten"] >= recs[0]["ops"]


@pytest.mark.parametrize("rows", [1, 3])
def test_the_mixed_step_ends_and_prefills_rows_requests(model, rows):
    rec = bench.measure_step(model, rows, length=8, max_tokens=3, repeats=1, count=True)
    parts = rec["parts"]

    def calls(label):
        return sum(p["calls"] for path, p in parts.items() if path.rsplit("/", 1)[-1] == label)
    assert calls("finish") == rows and calls("pc.snapshot") == 2 * rows          # an end and a prompt-end snapshot
    assert calls("prefill rows") == 1 and calls("forward") == 2                   # one prefill forward, one decode
    assert calls("pc.load_full") == rows
    assert sum(p["ms"] for p in parts.values()) == pytest.approx(rec["step_ms"], rel=0.05, abs=0.5)
    fwd = sum(p["ops"] for path, p in parts.items() if path.endswith("prefill rows/forward"))
    assert fwd == bench.measure_forward(model, rows, 8, repeats=1)["ops"]
    assert "forward" not in vars(model)                                          # unwrapped
    lines = bench.step_table(rec) + [bench.summary_line(rec)]
    assert f"R={rows}" in lines[0] and len(lines) == len(parts) + 3
