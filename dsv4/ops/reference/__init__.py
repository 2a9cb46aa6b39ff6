"""Plain-PyTorch specification of every op in dsv4.ops: fp32 inside, readable, never optimised. Registered as the
"reference" backend, which takes every call (the last choice of `auto`)."""
from ..dispatch import register
from . import (compressor, experts, indexer, linear, mhc, norm, packed, rope, routing, sequence_attn, sinkhorn,
               sparse_attn)

IMPLEMENTATIONS = {
    "sparse_attn": sparse_attn.sparse_attn,
    "sequence_attn": sequence_attn.sequence_attn,
    "indexer_topk": indexer.indexer_topk,
    "index_scores": indexer.index_scores,
    "compress_pool": compressor.compress_pool,
    "compress_groups": compressor.compress_groups,
    "compress_step": compressor.compress_step,
    "compress_steps": compressor.compress_steps,
    "cos_sin": rope.cos_sin,
    "rope_": rope.rope_,
    "rope": rope.rope,
    "hc_split_sinkhorn": sinkhorn.hc_split_sinkhorn,
    "hc_collapse": mhc.hc_collapse,
    "hc_post": mhc.hc_post,
    "hc_mixes": mhc.hc_mixes,
    "rms_norm": norm.rms_norm,
    "linear_fp32": linear.linear_fp32,
    "moe_route": routing.moe_route,
    "moe_experts": experts.moe_experts,
    "swiglu_expert": experts.swiglu_expert,
    "swiglu": packed.swiglu,
    "linear_fp8_weight": packed.linear_fp8_weight,
    "linear_fp8_grouped": packed.linear_fp8_grouped,
    "swiglu_fp8": packed.swiglu_fp8,
    "linear_fp4_weight": packed.linear_fp4_weight,
    "linear_fp8_fp8": packed.linear_fp8_fp8,
    "moe_experts_fp4": packed.moe_experts_fp4,
}
# the activation-dtype matmuls of the model's layers run under the caller's autocast, as nn.Linear and einsum do
UNDER_AUTOCAST = {
    "linear": linear.linear,
    "grouped_linear": linear.grouped_linear,
}

for _op, _fn in IMPLEMENTATIONS.items():
    register(_op, "reference", _fn)
for _op, _fn in UNDER_AUTOCAST.items():
    register(_op, "reference", _fn, under_autocast=True)
