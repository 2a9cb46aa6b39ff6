"""RMS normalisation as V4 computes it (v4-architecture §2): the model's RMSNorm layers in fp32 with an fp32
weight, and the per-head query norm without weight in the activation dtype (the reference does not upcast)."""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, in x.dtype. With `weight`: fp32 math, times weight; without: x.dtype math."""
    if weight is None:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    xf = x.float()
    return (weight.float() * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps))).to(x.dtype)
