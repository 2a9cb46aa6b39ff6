"""Compressor pooling (v4-architecture §3.4): a per-channel softmax over the candidate tokens of a group."""
from __future__ import annotations

import torch


def compress_pool(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """c[b,g,ch] = sum_t softmax_t(score[b,g,:,ch]) * kv[b,g,t,ch].  kv, score: [B, G, n, D] -> [B, G, D] fp32.

    Candidates padded with score -inf (and kv 0) get weight 0.
    """
    # the softmax written out: torch.softmax over a middle dim runs a slow "spatial" kernel on small inputs
    score = score.float()
    w = torch.exp(score - score.amax(dim=2, keepdim=True))
    return (kv.float() * w).sum(dim=2) / w.sum(dim=2)
