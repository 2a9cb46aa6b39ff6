"""RMS normalisation as V4 computes it (docs/architecture.md#overview): the model's RMSNorm layers in fp32 with an fp32
weight, and the per-head query norm without weight in the activation dtype (the reference does not upcast)."""
from __future__ import annotations

import torch

from .rope import rope_


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x / rms(x) over the last dim, in x.dtype. With `weight`: fp32 math, times weight; without: x.dtype math.
    rope (cos, sin): then rotate the trailing rope channels of the result (as rope_ does)."""
    if weight is None:
        y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    else:
        xf = x.float()
        y = (weight.float() * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps))).to(x.dtype)
    return y if rope is None else rope_(y, *rope)
