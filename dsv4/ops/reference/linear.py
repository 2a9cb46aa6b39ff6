"""The model's matrix products: the activation-dtype projections (the `Linear` layers, the grouped low-rank output
projection of attention) and the ones V4 keeps in fp32 (compressor, router, mHC, LM head)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T: x [..., K], w [N, K] -> [..., N] in x's dtype (under autocast, as autocast casts F.linear)."""
    return F.linear(x, w)


def grouped_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each group's own projection: y[b,s,g] = w[g] @ x[b,s,g]; x [B, S, G, I], w [G, R, I] -> [B, S, G, R] in x's
    dtype (docs/architecture.md#output-projection: wo_a per head group)."""
    return torch.einsum("bsgi,gri->bsgr", x, w.to(x.dtype))


def linear_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T in fp32: x [..., K], w [N, K] -> [..., N] fp32."""
    return F.linear(x.float(), w.float())
