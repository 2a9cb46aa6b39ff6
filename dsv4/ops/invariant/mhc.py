"""mHC mixing logits from the fixed-configuration matmul and row reduction, for batch-invariant mode."""
from __future__ import annotations

import torch

from .linear import matmul_nt
from .norm import rms_rsqrt


def hc_mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as ops.reference.mhc.hc_mixes."""
    xf = x.flatten(-2).float()
    return matmul_nt(xf, fn.float()) * rms_rsqrt(xf, eps)
