"""Routed experts as grouped GEMMs (`torch._grouped_mm`, CUTLASS on Hopper), registered as the "grouped" backend:
prefill, batched decode and training of bf16 experts on a GPU."""
import torch

from ..dispatch import register
from . import experts

if hasattr(torch, "_grouped_mm"):
    register("moe_experts", "grouped", experts.moe_experts, experts.supports)
