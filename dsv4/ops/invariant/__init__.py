"""Batch-invariant implementations: a sequence's logits do not depend on which other sequences share its batch.

Library GEMMs and reductions pick their algorithm (tile shape, split-K, split reductions) from the problem
size, so the same row can be summed in a different order at batch 1 and at batch 64. Registered as the
"invariant" backend, which the dispatcher picks for CUDA tensors inside `dsv4.ops.batch_invariant()`: every
matmul and row reduction of the model runs through Triton kernels with one fixed configuration per dtype
(linear.py, norm.py, mhc.py, experts.py), the sparse attention never splits its index lists and keeps one launch
configuration, the indexer's top-k lists come sorted by score, and the routed experts always run the per-pair
kernel with one row block: each row's arithmetic is the same whatever the batch. Ops without an implementation here are per row
already. Slower than the default, meant for reproducible evaluation and debugging.
"""
from functools import partial

from ..dispatch import register
from ..triton import experts as triton_experts
from ..triton import indexer as triton_indexer
from ..triton import sparse_attn as triton_sparse_attn
from . import experts, linear, mhc, norm


def _always(*args, **kwargs) -> bool:
    return True


# op -> (implementation, predicate saying whether it takes these arguments; where it does not, the usual choice)
IMPLEMENTATIONS = {
    "linear": (linear.linear, _always),
    "grouped_linear": (linear.grouped_linear, _always),
    "linear_fp32": (linear.linear_fp32, _always),
    "rms_norm": (norm.rms_norm, _always),
    "hc_mixes": (mhc.hc_mixes, _always),
    "swiglu_expert": (experts.swiglu_expert, experts.supports_swiglu_expert),
    "moe_experts": (partial(triton_experts.moe_experts, invariant=True), triton_experts.supports_any_batch),
    "sparse_attn": (partial(triton_sparse_attn.sparse_attn, invariant=True), triton_sparse_attn.supports),
    "indexer_topk": (partial(triton_indexer.indexer_topk, sort=True), triton_indexer.supports),
}

for _op, (_fn, _supports) in IMPLEMENTATIONS.items():
    register(_op, "invariant", _fn, _supports)
