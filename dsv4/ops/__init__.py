"""The swappable math of V4: attention over index lists, indexer top-k, compressor pooling, mHC (Sinkhorn,
lane collapse, post mix), routed experts. Model code calls only these names; `dispatch` picks an
implementation per call (explicit `backend=` argument, then the DSV4_BACKEND environment variable, then the
best available). `reference/` holds the plain-PyTorch spec of each op."""
from .invariant_mode import batch_invariant, set_batch_invariant
from .dispatch import (available_backends, compress_groups, compress_pool, compress_step, hc_collapse, hc_mixes, hc_post,
                       hc_split_sinkhorn, index_scores, indexer_topk, linear_fp32, moe_experts, moe_route, rms_norm,
                       rope, rope_, sequence_attn, sparse_attn, swiglu_expert)

__all__ = ["sparse_attn", "sequence_attn", "indexer_topk", "index_scores", "compress_pool", "compress_groups", "compress_step", "hc_split_sinkhorn",
           "hc_collapse", "hc_post", "hc_mixes", "rms_norm", "linear_fp32", "moe_experts", "moe_route", "swiglu_expert", "rope", "rope_", "available_backends",
           "batch_invariant", "set_batch_invariant"]
