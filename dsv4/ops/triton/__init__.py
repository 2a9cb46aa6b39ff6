"""Triton kernels for dsv4.ops (same signatures and file names as ops/reference), registered as the "triton"
backend: `auto` picks them for the CUDA tensors each one's predicate accepts. Under TRITON_INTERPRET=1 they also
run on the CPU (slowly), which is how CI checks their logic."""
from ..dispatch import register
from . import (compressor, experts, indexer, linear, mhc, norm, packed_experts, packed_linear, rope, routing,
               sequence_attn, sinkhorn, sparse_attn)

# op -> (implementation, predicate saying whether it takes these arguments)
IMPLEMENTATIONS = {
    "sparse_attn": (sparse_attn.sparse_attn, sparse_attn.supports),
    "sequence_attn": (sequence_attn.sequence_attn, sequence_attn.supports),
    "indexer_topk": (indexer.indexer_topk, indexer.supports),
    "index_scores": (indexer.index_scores, indexer.supports_scores),
    "hc_split_sinkhorn": (sinkhorn.hc_split_sinkhorn, sinkhorn.supports),
    "moe_experts": (experts.moe_experts, experts.supports),
    "swiglu_expert": (experts.swiglu_expert, experts.supports_dense),
    "compress_step": (compressor.compress_step, compressor.supports),
    "compress_steps": (compressor.compress_steps, compressor.supports),
    "compress_groups": (compressor.compress_groups, compressor.supports_groups),
    "rope_": (rope.rope_, rope.supports),
    "rope": (rope.rope, rope.supports_differentiable),
    "hc_collapse": (mhc.hc_collapse, mhc.supports),
    "hc_post": (mhc.hc_post, mhc.supports_post),
    "hc_mixes": (mhc.hc_mixes, mhc.supports_mixes),
    "rms_norm": (norm.rms_norm, norm.supports),
    "linear_fp32": (linear.linear_fp32, linear.supports),
    "moe_route": (routing.moe_route, routing.supports),
    "linear_fp8_weight": (packed_linear.linear_fp8_weight, packed_linear.supports),
    "linear_fp8_grouped": (packed_linear.linear_fp8_grouped, packed_linear.supports_grouped),
    "swiglu_fp8": (packed_linear.swiglu_fp8, packed_linear.supports_swiglu),
    "linear_fp4_weight": (packed_linear.linear_fp4_weight, packed_linear.supports_fp4),
    "linear_fp8_fp8": (packed_linear.linear_fp8_fp8, packed_linear.supports_fp8_fp8),
    "moe_experts_fp4": (packed_experts.moe_experts_fp4, packed_experts.supports),
}

for _op, (_fn, _supports) in IMPLEMENTATIONS.items():
    register(_op, "triton", _fn, _supports)
