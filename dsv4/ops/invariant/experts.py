"""The shared expert for batch-invariant mode: its three projections as fixed-configuration GEMMs around the fp32
SwiGLU, for every number of tokens. (The fused decode kernel the usual choice runs up to triton.experts.MAX_PAIRS
tokens sums a row differently from these GEMMs, so a token's output would change between batches of 16 and 17.)"""
from __future__ import annotations

import torch

from ..reference.experts import swiglu
from .linear import matmul_nt


def swiglu_expert(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, limit: float) -> torch.Tensor:
    """Same contract as ops.reference.experts.swiglu_expert."""
    return matmul_nt(swiglu(matmul_nt(x, w1), matmul_nt(x, w3), limit).to(x.dtype), w2)


def supports_swiglu_expert(x: torch.Tensor, *args) -> bool:
    return True
