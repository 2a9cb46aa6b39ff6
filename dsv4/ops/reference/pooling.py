"""Compressor pooling (v4-architecture §3.4): a per-channel softmax over the candidate tokens of a group."""
from __future__ import annotations

import torch


def compress_pool(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """c[b,g,ch] = sum_t softmax_t(score[b,g,:,ch]) * kv[b,g,t,ch].  kv, score: [B, G, n, D] -> [B, G, D] fp32.

    Candidates padded with score -inf (and kv 0) get weight 0.
    """
    return (kv.float() * torch.softmax(score.float(), dim=2)).sum(dim=2)
