"""Manifold-constrained hyper-connections (mHC, docs/architecture.md#mhc).

The residual stream is R = hc_mult lanes [B, S, R, C]. Around each sublayer:
  pre:  y = sum_i pre_i * lane_i                       (collapses the lanes into the sublayer input)
  post: lane'_k = post_k * f(y) + sum_j comb[j, k] * lane_j
pre/post/comb are computed from the (RMS-normalised, flattened) lanes; comb is projected towards the
doubly-stochastic matrices by Sinkhorn-Knopp, so the residual mixing cannot amplify the stream.
Lanes are stored in the activation dtype; all mixing math is fp32.
"""
from __future__ import annotations

import math

import torch

from .. import ops


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
           norm_eps: float, hc_eps: float, constrained: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [B, S, R, C] -> (sublayer input [B, S, C] in x.dtype, post [B, S, R], comb [B, S, R, R]).

    `constrained=False` is the unconstrained hyper-connection ablation: comb is the raw affine map of the
    logits (no softmax, no Sinkhorn), so nothing keeps the residual mixing from amplifying."""
    R = x.shape[2]
    mixes = ops.hc_mixes(x, fn, norm_eps)                               # [B, S, (2+R)*R] fp32
    if constrained:
        pre, post, comb = ops.hc_split_sinkhorn(mixes, scale, base, R, iters, hc_eps)
    else:
        pre, post, _ = ops.hc_split_sinkhorn(mixes, scale, base, R, 1, hc_eps)
        comb = (mixes[..., 2 * R:] * scale[2] + base[2 * R:]).unflatten(-1, (R, R))
    return ops.hc_collapse(x, pre), post, comb


def hc_post(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """f: [B, S, C] sublayer output, residual: [B, S, R, C] -> new lanes [B, S, R, C] (comb^T mixes lanes)."""
    return ops.hc_post(f, residual, post, comb)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
            hc_eps: float) -> torch.Tensor:
    """Final collapse of the lanes: [B, S, R, C] -> [B, S, C], sigmoid weights, no Sinkhorn."""
    mixes = ops.hc_mixes(x, fn, norm_eps)                               # [B, S, R] fp32
    pre = torch.sigmoid(mixes * scale.float() + base.float()) + hc_eps
    return ops.hc_collapse(x, pre)


def init_hc_params(fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc: int,
                   generator: torch.Generator | None = None, constrained: bool = True) -> None:
    """Start close to a plain pre-norm residual (documented choice; V4 only says "alpha small"):
    pre = sigmoid(-ln 3) = 1/4 (the collapse of R identical lanes is their mean), post = 2*sigmoid(0) = 1,
    comb logits with a diagonal gap of 4 (after Sinkhorn ~0.9 on the diagonal; the identity when unconstrained),
    small dynamic part
    (fn ~ N(0, 0.02), scales alpha = 0.01). With identical lanes the block is then exactly x + f(x)."""
    with torch.no_grad():
        fn.copy_(torch.empty(fn.shape).normal_(0.0, 0.02, generator=generator))  # CPU draws: any device
        scale.fill_(0.01)
        if base.numel() == hc:  # hc_head: only pre weights
            base.fill_(-math.log(hc - 1) if hc > 1 else 10.0)
            return
        base.zero_()
        base[:hc] = -math.log(hc - 1) if hc > 1 else 10.0
        base[2 * hc:] = (4.0 if constrained else 1.0) * torch.eye(hc).flatten()  # unconstrained: comb = I


def residual_gain(combs: list[torch.Tensor]) -> float:
    """Amax gain of the composed residual mixing over the given sublayers (in order): the largest absolute row
    or column sum of prod_l comb_l^T, maximised over tokens. 1 for a doubly-stochastic chain; unconstrained
    hyper-connections can drift far from it (mHC paper, Fig. 7)."""
    m = None
    for c in combs:                                    # lanes_new = comb^T lanes
        ct = c.float().transpose(-1, -2)
        m = ct if m is None else ct @ m
    if m is None:
        return 1.0
    rows = m.abs().sum(-1).amax(-1)
    cols = m.abs().sum(-2).amax(-1)
    return float(torch.maximum(rows, cols).max())
