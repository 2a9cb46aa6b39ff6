"""Routed experts for a handful of tokens as batched matmuls over the gathered expert matrices, registered as the
"gathered" backend: decoding where neither the Triton kernel nor grouped GEMMs apply (e.g. fp32 on a GPU)."""
from ..dispatch import register
from . import experts

register("moe_experts", "gathered", experts.moe_experts, experts.supports)
