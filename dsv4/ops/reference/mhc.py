"""mHC lane arithmetic (docs/architecture.md#mhc): collapsing the lanes into a sublayer input, and the post mix."""
from __future__ import annotations

import torch


def hc_collapse(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y[..., c] = sum_i weights[..., i] * x[..., i, c] in fp32, returned in x.dtype.  x: [..., R, C]."""
    return (weights.float().unsqueeze(-1) * x.float()).sum(dim=-2).to(x.dtype)


def hc_post(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """lane'[k] = post[k] * f + sum_j comb[j, k] * lane[j] in fp32, returned in f.dtype.

    f: [B, S, C]; residual: [B, S, R, C]; post: [B, S, R]; comb: [B, S, R, R]."""
    y = post.unsqueeze(-1) * f.float().unsqueeze(-2) + torch.einsum("bsjk,bsjc->bskc", comb, residual.float())
    return y.to(f.dtype)


def hc_mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """The mHC mixing logits of the flattened lanes, (fn . x) / rms(x) in fp32: x [..., R, C], fn [M, R*C] ->
    [..., M]."""
    xf = x.flatten(-2).float()
    return torch.nn.functional.linear(xf, fn.float()) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
