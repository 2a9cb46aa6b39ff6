"""The shared expert for more tokens than the fused decode kernel takes, for batch-invariant mode: its three
projections as fixed-configuration GEMMs around the fp32 SwiGLU. Up to MAX_PAIRS tokens the usual choice runs
(the fused kernel, whose arithmetic is per token already)."""
from __future__ import annotations

import torch

from ..reference.experts import swiglu
from ..triton.experts import MAX_PAIRS
from .linear import matmul_nt


def swiglu_expert(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, limit: float) -> torch.Tensor:
    """Same contract as ops.reference.experts.swiglu_expert."""
    return matmul_nt(swiglu(matmul_nt(x, w1), matmul_nt(x, w3), limit).to(x.dtype), w2)


def supports_swiglu_expert(x: torch.Tensor, *args) -> bool:
    return x.shape[0] > MAX_PAIRS
