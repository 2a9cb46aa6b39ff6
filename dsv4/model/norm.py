"""RMSNorm as V4 computes it: fp32 math with an fp32 weight, result cast back to the input dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # (elementwise ops stay fp32 under autocast)
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


def rms_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS normalisation in x's own dtype (the reference's per-head q norm does no fp32 upcast)."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def linear_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T in fp32 even under autocast: where V4 needs fp32 (compressor scores, router, mHC mixes, head)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), w.float())
