"""`dsv4 kv` numbers: equal to what the cache allocates, and the published V4-vs-V3.2 ratios at 1M."""
import json

import pytest
import torch

import dsv4
from dsv4.cache import KVCache
from dsv4.cache.accounting import kv_report
from dsv4.cli import main


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("kv, idx", [("fp8", "fp4"), ("fp8", "fp8"), ("bf16", "bf16"), ("fp32", "fp32")])
@pytest.mark.parametrize("context", [1000, 4096])
def test_report_equals_allocation(preset, kv, idx, context):
    cfg = dsv4.ModelConfig.preset(preset)
    cache = KVCache(cfg, 1, context, kv, idx, torch.float32)
    assert cache.nbytes == kv_report(cfg, context, kv, idx)["bytes_total"]


@pytest.mark.parametrize("preset, fp4_pct, fp8_pct", [("flash", 7.3, 8.0), ("pro", 10.5, 11.5)])
def test_published_ratio_at_1m(preset, fp4_pct, fp8_pct):
    cfg = dsv4.ModelConfig.preset(preset)
    assert round(100 * kv_report(cfg, 1 << 20, "fp8", "fp4")["ratio_vs_v32"], 1) == fp4_pct
    assert round(100 * kv_report(cfg, 1 << 20, "fp8", "fp8")["ratio_vs_v32"], 1) == fp8_pct
    assert kv_report(cfg, 1 << 20)["v32_bytes_per_token"] == 61 * (656 + 132)


def test_kv_cli(capsys, tmp_path):
    assert main(["kv", "--preset", "flash", "--context", "1048576", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["context"] == 1 << 20 and rep["bytes_total"] > 0
    assert rep["ratio_vs_v32"] == pytest.approx(rep["bytes_total"] / rep["v32_bytes_total"])
    assert main(["kv", "--preset", "tiny", "--context", "4096", "--plot", str(tmp_path / "kv.png")]) == 0
    assert "DeepSeek-V3.2" in capsys.readouterr().out and (tmp_path / "kv.png").stat().st_size > 10000
    assert main(["kv", "--preset", "tiny", "--context", "0"]) == 2
