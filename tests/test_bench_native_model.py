"""bench/native_model.py: the --tiny-cpu smoke run writes its JSON, and the real-dims extrapolation it rests on gives
the bytes of the whole model from a cut's measured parts (checked against the whole model built and loaded)."""
import json
import os
import sys

import pytest
import torch

import dsv4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import native_model  # noqa: E402  (bench/native_model.py)


def test_native_model_bench_smoke_run(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV4_COMMIT", "test")
    out = tmp_path / "native_model.json"
    native_model.main(["--tiny-cpu", "--json", str(out), "--profile"])
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu"
    mem = doc["memory"]
    # the native model holds the checkpoint's bytes (less its headers), up to the fp32 widening it reports
    assert 0.9 < mem["native"]["held_over_disk_unwidened"] <= 1.0
    assert mem["native"]["held_bytes"] < mem["bf16"]["held_bytes"]
    names = {r["name"] for r in doc["speed"] if "error" not in r}
    assert {"native prefill", "native decode b1", "bf16 prefill", "bf16 decode b1"} <= names
    assert len(doc["ratios"]) == 3
    for w in ("native b1", "bf16 b1", "native b3", "bf16 b3"):   # (d): per-op times of a decode step, most first
        prof = doc["profile"][w]
        times = [r["us_per_step"] for r in prof["kernels"]]
        assert times and times == sorted(times, reverse=True) and prof["context"] == 32
    real = doc["real"]
    for fmt in ("bf16", "fp8"):   # the real cache's bytes are the accounting's
        assert real["cache"][fmt]["measured_at_max"] == real["cache"][fmt]["accounting_at_max"]
    assert all(c["max_layers_one_gpu"] == 4 and c["fits_two_gpus"] for c in real["capacity"].values())


def test_real_cut_has_one_layer_per_kind():
    full = dsv4.ModelConfig.from_pretrained(os.path.join(ROOT, "tests", "fixtures", "deepseek-v4-flash"))
    cut = native_model.real_cut(full)
    assert [cut.layer_kind(i) for i in range(cut.n_layers)] == ["window", "csa", "hca"]
    assert [cut.is_hash_layer(i) for i in range(cut.n_layers)] == [True, False, False]
    assert cut.n_mtp_layers == 1 and cut.n_routed_experts == 256 and cut.dim == full.dim


@pytest.mark.parametrize("weights", ["native", "bf16"])
def test_extrapolated_bytes_equal_the_whole_models(tmp_path, weights):
    """The tiny preset (4 layers: window+hash, CSA, HCA, CSA; MTP) from its 3-layer cut's parts, against the whole
    model saved in the official formats and loaded."""
    full = dsv4.ModelConfig.preset("tiny").replace(o_lora_rank=128)
    cut = native_model.real_cut(full)
    paths = {}
    for name, cfg in (("cut", cut), ("full", full)):
        model = native_model.build_model(cfg, "cpu")
        paths[name] = tmp_path / name
        native_model.write_official(model, str(paths[name]))
    parts = native_model.layer_parts(dsv4.load_model(paths["cut"], weights=weights))
    whole = dsv4.load_model(paths["full"], weights=weights)
    est = native_model.extrapolate_weights(full, parts)
    assert est["total"] == native_model.tensor_bytes(whole)
    assert est["main_total"] == native_model.tensor_bytes(whole) - sum(native_model.tensor_bytes(b) for b in whole.mtp)
    # the checkpoint's bytes extrapolate the same way (the whole checkpoint's tensor bytes from torch's loader)
    from safetensors.torch import load_file
    disk = native_model.extrapolate_weights(full, native_model.disk_parts(str(paths["cut"]), cut))
    tensors = load_file(str(paths["full"] / "model.safetensors"))
    assert disk["total"] == sum(t.numel() * t.element_size() for t in tensors.values())
