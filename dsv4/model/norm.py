"""RMSNorm as V4 computes it (fp32 math with an fp32 weight, result cast back to the input dtype), and the
linear layers; both run through dsv4.ops, so they follow its modes (batch-invariant mode included)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear without bias (the checkpoint's `.weight` name) whose matmul is the op `linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:  # (no V4 layer has one)
            return F.linear(x, self.weight, self.bias)
        return ops.linear(x, self.weight)
