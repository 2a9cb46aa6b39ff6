"""The fp32 matrix products V4 keeps in fp32 (compressor, router, mHC, LM head)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T in fp32: x [..., K], w [N, K] -> [..., N] fp32."""
    return F.linear(x.float(), w.float())
