"""RMSNorm as V4 computes it (fp32 math with an fp32 weight, result cast back to the input dtype), and the
linear layers; both follow the batch-invariant mode (dsv4.ops.batch_invariant)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import invariant_mode as bi


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bi.active(x):
            xf = x.float()
            return (self.weight.float() * (xf * rsqrt_mean_square(xf, self.eps))).to(x.dtype)
        return ops.rms_norm(x, self.weight, self.eps)


def rsqrt_mean_square(x: torch.Tensor, eps: float) -> torch.Tensor:
    if bi.active(x):
        return bi.rms_rsqrt(x, eps).to(x.dtype)
    return torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


class Linear(nn.Linear):
    """nn.Linear without bias (the checkpoint's `.weight` name) whose matmul follows the batch-invariant mode."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bi.active(x) and self.bias is None:
            return bi.linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)


def rms_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS normalisation in x's own dtype (the reference's per-head q norm does no fp32 upcast)."""
    return x * rsqrt_mean_square(x, eps) if bi.active(x) else ops.rms_norm(x, None, eps)


def linear_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T in fp32 even under autocast: where V4 needs fp32 (compressor scores, router, mHC mixes, head)."""
    if bi.active(x):
        return bi.linear(x.float(), w.float())
    return ops.linear_fp32(x, w)
