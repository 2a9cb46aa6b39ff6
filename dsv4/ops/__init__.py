"""The swappable math of V4: attention over index lists, indexer top-k, compressor pooling, mHC (Sinkhorn,
lane collapse, post mix), routed experts, norms, RoPE and the model's matmuls. Model code calls only these names;
`dispatch` picks an implementation per call (explicit `backend=` argument, then the DSV4_BACKEND environment
variable, then the best available for the call and the modes below). `reference/` holds the plain-PyTorch spec of
each op, the other folders its faster backends.

Modes: `batch_invariant()` (a sequence's logits independent of its batch) and `training_kernels("triton" |
"compiled")` (which kernels training calls run on a GPU) and `training_compile(on)` (whether the ops without a Triton
training kernel run torch.compile'd or eager there)."""
from . import compiled, gathered, grouped, reference  # each backend registers its implementations on import

try:  # GPU kernels: chosen by `auto` for CUDA tensors they support, selectable by name anywhere
    from . import invariant, triton
except ImportError:  # no Triton on this machine: the references serve every call
    pass

from .api import (compress_groups, compress_pool, compress_step, compress_steps, cos_sin, grouped_linear, hc_collapse,
                  hc_mixes, hc_post, hc_split_sinkhorn, index_scores, indexer_topk, linear, linear_fp4_weight,
                  linear_fp8_fp8, linear_fp8_grouped, linear_fp8_weight, linear_fp32, moe_experts, moe_experts_fp4,
                  moe_route, rms_norm, rope, rope_, sequence_attn, sparse_attn, swiglu, swiglu_expert,
                  swiglu_fp8)
from .compiled.torch_compile import compiled_or_eager, training_compile
from .dispatch import available_backends, batch_invariant, training_kernels

__all__ = ["sparse_attn", "sequence_attn", "indexer_topk", "index_scores", "compress_pool", "compress_groups",
           "compress_step", "compress_steps", "hc_split_sinkhorn", "hc_collapse", "hc_post", "hc_mixes", "rms_norm", "linear",
           "grouped_linear", "linear_fp32", "moe_experts", "moe_route", "swiglu_expert", "linear_fp8_weight",
           "linear_fp8_grouped", "swiglu_fp8", "linear_fp4_weight", "linear_fp8_fp8", "moe_experts_fp4", "swiglu",
           "cos_sin", "rope", "rope_", "compiled_or_eager", "available_backends", "batch_invariant", "training_kernels",
           "training_compile"]
