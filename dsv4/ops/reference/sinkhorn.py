"""mHC mixing weights with the Sinkhorn-Knopp projection, in exactly the reference's order
(docs/architecture.md#sinkhorn)."""
from __future__ import annotations

import torch


def hc_split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the (2+hc)*hc mHC logits into pre [.., hc], post [.., hc] and comb [.., hc, hc] (all fp32).

    Logit layout: [pre (hc) | post (hc) | comb (hc*hc, row-major: 2*hc + hc*j + k is comb[j, k])],
    scaled by scale[0], scale[1], scale[2] and shifted by `base`.
    pre = sigmoid + eps; post = 2 * sigmoid; comb = row softmax + eps, then one column normalisation,
    then (iters - 1) rounds of row then column normalisation (the last step leaves columns summing to 1).
    """
    mixes, scale, base = mixes.float(), scale.float(), base.float()
    pre = torch.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * torch.sigmoid(mixes[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    logits = mixes[..., 2 * hc:] * scale[2] + base[2 * hc:]
    comb = torch.softmax(logits.unflatten(-1, (hc, hc)), dim=-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb
