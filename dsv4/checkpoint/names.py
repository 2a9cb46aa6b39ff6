"""The one table of checkpoint names (style guide habit 12).

Three namings reach us: the official hub naming (`layers.3.attn.wq_a.weight`, FP8/FP4 weights with
`.scale`), the one `transformers` writes on save (the official names under `model.`, plus
`model.embed_tokens`, `model.hc_head.hc_fn` and `attn.norm` for the attention's kv_norm), and the
`transformers` module naming (`self_attn.q_a_proj`, fused `experts.gate_up_proj`, ...). `to_official`
rewrites any of them into the official naming; `official_to_native` maps that onto our parameters,
which equal the official names except for the stacked routed experts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_L = r"((?:layers|mtp)\.\d+)"

# Weights the official checkpoint stores in FP8 e4m3 with 128x128 block scales (docs/architecture.md#number-formats);
# the routed experts are FP4. Native loading keeps exactly these layers packed.
FP8_WEIGHTS = ("attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight",
               "attn.wo_b.weight", "shared_experts.w1.weight", "shared_experts.w2.weight", "shared_experts.w3.weight",
               "indexer.wq_b.weight", "e_proj.weight", "h_proj.weight")
# Applied in order; each (pattern, replacement) is a re.sub over the whole key.
_TO_OFFICIAL: list[tuple[str, str]] = [
    (r"^model\.", ""),
    (r"^embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"(\.compressor\.)kv_proj\.", r"\1wkv."),
    (r"(\.compressor\.)gate_proj\.", r"\1wgate."),
    (r"(\.compressor\.)kv_norm\.", r"\1norm."),
    (r"(\.compressor\.)position_bias$", r"\1ape"),
    (r"\.attn\.q_a_proj\.", ".attn.wq_a."),
    (r"\.attn\.q_a_norm\.", ".attn.q_norm."),
    (r"\.attn\.q_b_proj\.", ".attn.wq_b."),
    (r"\.attn\.kv_proj\.", ".attn.wkv."),
    (r"\.attn\.o_a_proj\.", ".attn.wo_a."),
    (r"\.attn\.o_b_proj\.", ".attn.wo_b."),
    (r"\.attn\.sinks$", ".attn.attn_sink"),
    (rf"^{_L}\.attn\.norm\.", r"\1.attn.kv_norm."),  # transformers' saved name of the attention kv_norm
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
    (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.weight_scale_inv$", ".scale"),
]
_COMPILED = [(re.compile(p), r) for p, r in _TO_OFFICIAL]

_EXPERT = re.compile(rf"^{_L}\.ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)$")
_FUSED = re.compile(rf"^{_L}\.ffn\.experts\.(gate_up_proj|down_proj)$")


def to_official(name: str) -> str:
    for pattern, repl in _COMPILED:
        name = pattern.sub(repl, name)
    return name


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor lands: `param[expert]` (expert None: the whole parameter), optionally only
    rows `rows` of it (the halves of transformers' fused gate_up_proj)."""
    param: str
    expert: int | None = None
    rows: slice | None = None


def official_to_native(name: str, n_inter: int) -> list[Target]:
    """Native targets of an official(-ized) weight name (not of `.scale` tensors)."""
    m = _EXPERT.match(name)
    if m:
        return [Target(f"{m[1]}.ffn.experts.{m[3]}", int(m[2]))]
    m = _FUSED.match(name)
    if m:
        if m[2] == "down_proj":
            return [Target(f"{m[1]}.ffn.experts.w2")]
        return [Target(f"{m[1]}.ffn.experts.w1", rows=slice(0, n_inter)),
                Target(f"{m[1]}.ffn.experts.w3", rows=slice(n_inter, 2 * n_inter))]
    return [Target(name)]


def native_to_official(param: str, n_experts: int) -> list[tuple[str, int | None]]:
    """Official names (and expert slice) under which a native parameter is saved."""
    m = re.match(rf"^{_L}\.ffn\.experts\.(w[123])$", param)
    if m:
        return [(f"{m[1]}.ffn.experts.{e}.{m[2]}.weight", e) for e in range(n_experts)]
    return [(param, None)]
