"""Routed experts for a handful of tokens (decoding) where neither the Triton kernel nor grouped GEMMs apply
(e.g. fp32 on a GPU): gather each (token, slot)'s expert matrices and run them as batched matmuls. A fixed
number of kernels and no host synchronisation (the reference loops over experts after a bincount, which does)."""
from __future__ import annotations

import torch

from ..reference.experts import swiglu

MAX_PAIRS = 64  # (token, slot) pairs: beyond this a grouped GEMM over experts reads fewer bytes


def moe_experts(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, idx: torch.Tensor,
                weights: torch.Tensor, swiglu_limit: float) -> torch.Tensor:
    """Same contract as ops.reference.experts.moe_experts."""
    N, k = idx.shape
    e = idx.flatten()
    xs = x.repeat_interleave(k, dim=0).unsqueeze(-1)                        # [N*k, C, 1]
    gate = torch.bmm(w1[e].to(x.dtype), xs).squeeze(-1)                      # [N*k, F]
    up = torch.bmm(w3[e].to(x.dtype), xs).squeeze(-1)
    h = swiglu(gate, up, swiglu_limit) * weights.flatten().unsqueeze(-1).float()
    y = torch.bmm(w2[e].to(x.dtype), h.to(x.dtype).unsqueeze(-1)).squeeze(-1).float()   # [N*k, C]
    return y.view(N, k, -1).sum(1)


def supports(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, idx: torch.Tensor, *args) -> bool:
    """CUDA inference with at most MAX_PAIRS (token, slot) pairs."""
    return x.is_cuda and not (torch.is_grad_enabled() and x.requires_grad) and idx.numel() <= MAX_PAIRS
