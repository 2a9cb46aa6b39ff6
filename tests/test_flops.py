"""`dsv4 flops`' analytic count against torch's FLOP counter on the model's own decode step.

One decode token at context N (position N - 1, N >= window) runs through the cached path under
`torch.utils.flop_counter.FlopCounterMode`, which counts the matmul-like ops (mm, bmm, einsum's bmm, ...). Its
per-module counts are grouped into the components of dsv4/info/flops.py, each of which must be within 2% of
the analytic count (they are equal when both count the same products). Element-wise work is counted by neither.
At full scale the context-free count is checked against the active parameters `dsv4 info` counts.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dsv4
from dsv4 import ops
from dsv4.config import ModelConfig
from dsv4.info.flops import COMPONENTS, flops_report, v4_flops


class AttentionCore(nn.Module):
    """A parameterless module around ops.sparse_attn, so the counter tells the core attention apart from the
    grouped output projection that runs in the same Attention.forward."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _component(path: str) -> str:
    """The component of a module's own (exclusive) FLOPs (an Attention's own products are split by the caller)."""
    parts = path.split(".")
    if path == "AttentionCore":
        return "attention"
    if path == "Transformer":
        return "head"                   # the final lane collapse's logits and the LM head run in Transformer
    if "compressor" in parts:
        return "compressor"
    if "indexer" in parts:
        return "indexer"
    if "ffn" in parts:
        return "experts"
    if len(parts) > 2 and parts[-2] == "attn":
        return "projections"            # wq_a, wq_b, wkv, wo_b
    if len(parts) == 3 and parts[1] == "layers":
        return "mhc"                    # a Block's own products: hc_pre's mixes and hc_post's lane mix
    raise AssertionError(f"no component for module {path}")


def measured_components(cfg: ModelConfig, context: int, monkeypatch) -> dict[str, float]:
    torch.manual_seed(0)
    model = dsv4.Transformer(cfg).init_weights(0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, context))
    core = AttentionCore(ops.sparse_attn)
    monkeypatch.setattr(ops, "sparse_attn", core)
    with torch.no_grad():
        cache = model.new_cache(1, context + 8)
        model(tokens[:, :-1], cache=cache, last_only=True)
        with FlopCounterMode(display=False) as counter:
            model(tokens[:, -1:], cache=cache, last_only=True)
    inclusive = {name: sum(ops_.values()) for name, ops_ in counter.get_flop_counts().items() if name != "Global"}
    own = dict(inclusive)  # each module's products minus those of the modules it called
    for name, flops in inclusive.items():
        parent = _nearest_ancestor(name, inclusive)
        if parent is not None:
            own[parent] -= flops
    out = {c: 0.0 for c in COMPONENTS}
    for name, flops in own.items():
        if name.endswith(".attn"):  # an Attention's own products: the grouped wo_a and the core attention
            out["projections"] += flops
        elif flops:
            out[_component(name)] += flops
    out["projections"] -= out["attention"]  # the tagged core's products, counted in its Attention's too
    return out


def _nearest_ancestor(name: str, names) -> str | None:
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:k]) in names:
            return ".".join(parts[:k])
    return None


CASES = {
    "tiny": (ModelConfig.preset("tiny"), 200),
    # a different shape of every part: more entries than top-k in CSA, several groups and heads, no hash layer
    "wide": (ModelConfig.preset("tiny").replace(n_heads=8, o_groups=4, index_topk=16, window_size=16,
                                                n_hash_layers=0, compress_ratios=(4, 8, 4, 0, 0)), 131),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_components_match_the_flop_counter(name, monkeypatch):
    cfg, context = CASES[name]
    measured = measured_components(cfg, context, monkeypatch)
    analytic = v4_flops(cfg, context)
    for c in COMPONENTS:
        assert measured[c] == pytest.approx(analytic[c], rel=0.02), (c, measured, analytic)
    assert all(analytic[c] > 0 for c in COMPONENTS)


def test_report_ratio_and_growth():
    """The report's totals are its components' sums; V4's cost grows far slower with context than V3.2's."""
    pro = ModelConfig.preset("pro")
    short, long = flops_report(pro, 4096), flops_report(pro, 1 << 20)
    assert long["flops_per_token"] == pytest.approx(sum(long["components"].values()))
    assert long["ratio_vs_v32"] == pytest.approx(long["flops_per_token"] / long["v32_flops_per_token"])
    assert long["ratio_vs_v32"] < short["ratio_vs_v32"]


@pytest.mark.parametrize("preset", ["flash", "pro"])
def test_context_free_flops_are_twice_the_active_parameters(preset):
    """Without context (one position, no entries) every counted product is one multiply-add per active weight
    (plus mHC's lane mix, ~0.02%): twice `dsv4 info`'s active parameters (13B Flash, 49B Pro)."""
    from dsv4.info import param_report
    cfg = ModelConfig.preset(preset)
    flops = v4_flops(cfg, 1)
    assert (sum(flops.values()) - flops["attention"]) / 2 == pytest.approx(param_report(cfg)["active_params"],
                                                                           rel=1e-3)


def test_cli_json_mirrors_kv(capsys):
    from dsv4.cli import main
    assert main(["flops", "--preset", "flash", "--context", "65536", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["context"] == 65536 and set(out["components"]) == set(COMPONENTS)
    assert out["ratio_vs_v32"] == pytest.approx(out["flops_per_token"] / out["v32_flops_per_token"])
    assert main(["flops", "--preset", "flash", "--context", "0"]) == 2
