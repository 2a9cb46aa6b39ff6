"""Compressor pooling (docs/architecture.md#compressor): a per-channel softmax over the candidate tokens of a group."""
from __future__ import annotations

import torch

from .rope import cos_sin, rope_


def compress_pool(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """c[b,g,ch] = sum_t softmax_t(score[b,g,:,ch]) * kv[b,g,t,ch].  kv, score: [B, G, n, D] -> [B, G, D] fp32.

    Candidates padded with score -inf (and kv 0) get weight 0.
    """
    # the softmax written out: torch.softmax over a middle dim runs a slow "spatial" kernel on small inputs
    score = score.float()
    w = torch.exp(score - score.amax(dim=2, keepdim=True))
    return (kv.float() * w).sum(dim=2) / w.sum(dim=2)


def compress_groups(kv: torch.Tensor, score: torch.Tensor, ratio: int, overlap: bool, n: int,
                    prev: tuple[torch.Tensor, torch.Tensor] | None = None, ape: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """The entries of n whole groups (prefill): kv, score [B, L >= n*ratio, coff*d] fp32 projections with group i
    at rows i*ratio .. (i+1)*ratio - 1. ape [ratio, coff*d]: the position bias added to score by phase (None: in
    score already). Entry i pools its group's rows; with overlap, channels d.. of its own group's rows together
    with channels ..d of the previous group's, for entry 0 `prev` = (kv, score) [B, ratio, d] (None: no such
    rows). Returns [B, n, d] fp32 (NaN where every candidate score is -inf)."""
    m, L = ratio, kv.shape[1]
    d = kv.shape[-1] // 2 if overlap else kv.shape[-1]
    if ape is not None:  # the bias repeats every m rows (a broadcast, summed in backward)
        score = score + ape.float().repeat(-(-L // m), 1)[:L]
    groups_kv = kv[:, :n * m].unflatten(1, (n, m))                      # [B, n, m, coff*d]
    groups_sc = score[:, :n * m].unflatten(1, (n, m))
    if overlap:
        if prev is None:
            prev = kv.new_zeros(kv.shape[0], m, d), kv.new_full((kv.shape[0], m, d), float("-inf"))
        # candidates of entry i: group i-1's A-half (rows 0..m-1), then group i's B-half (rows m..2m-1)
        a_kv = torch.cat((prev[0].unsqueeze(1), groups_kv[:, :-1, :, :d]), dim=1)
        a_sc = torch.cat((prev[1].unsqueeze(1), groups_sc[:, :-1, :, :d]), dim=1)
        groups_kv = torch.cat((a_kv, groups_kv[..., d:]), dim=2)
        groups_sc = torch.cat((a_sc, groups_sc[..., d:]), dim=2)
    return compress_pool(groups_kv, groups_sc)


def compress_step(kv: torch.Tensor, score: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
                  pos0: torch.Tensor, ratio: int, overlap: bool, norm_weight: torch.Tensor, eps: float,
                  freqs: torch.Tensor, out_dtype: torch.dtype, ape: torch.Tensor | None = None) -> torch.Tensor:
    """One decode token per row through a compressor (docs/architecture.md#compressor), state updated in place.

    kv, score: [B, coff*d] fp32 projections of the token; ape [m, coff*d]: the position bias added to score at
    the token's phase pos0 % m (None: score includes it already); state_kv/score: [B, coff*m,
    coff*d] (CompressorState layout); pos0: [B] the token's position. Returns the entry of the group the token
    belongs to, normalised and roped at the group's first position, [B, d] in out_dtype: a finished entry
    where the token completes its group (pos0 % ratio == ratio - 1), a partial one (to be ignored) elsewhere.
    """
    m, W2 = ratio, kv.shape[-1]
    d = W2 // 2 if overlap else W2
    off = m if overlap else 0
    r0 = pos0 % m
    if ape is not None:
        score = score + ape.float()[r0]
    slot = (torch.arange(state_kv.shape[1], device=kv.device) == (off + r0).unsqueeze(1)).unsqueeze(-1)
    skv = torch.where(slot, kv.unsqueeze(1), state_kv)
    ssc = torch.where(slot, score.unsqueeze(1), state_score)
    if overlap:  # previous group's A-half with this group's B-half
        cand_kv = torch.cat((skv[:, :m, :d], skv[:, m:, d:]), 1)
        cand_sc = torch.cat((ssc[:, :m, :d], ssc[:, m:, d:]), 1)
    else:
        cand_kv, cand_sc = skv, ssc
    pooled = compress_pool(cand_kv.unsqueeze(1), cand_sc.unsqueeze(1))[:, 0]          # [B, d] fp32
    done = (r0 == m - 1).view(-1, 1, 1)
    if overlap:  # a completed group becomes the previous group; the unfinished half empties
        nxt_kv = torch.cat((skv[:, m:], torch.zeros_like(skv[:, m:])), 1)
        nxt_sc = torch.cat((ssc[:, m:], torch.full_like(ssc[:, m:], float("-inf"))), 1)
    else:
        nxt_kv, nxt_sc = torch.zeros_like(skv), torch.full_like(ssc, float("-inf"))
    state_kv.copy_(torch.where(done, nxt_kv, skv))
    state_score.copy_(torch.where(done, nxt_sc, ssc))
    # RMSNorm of the entry in out_dtype (fp32 math), then RoPE of its trailing dims at the group's first position
    e = pooled.to(out_dtype).float()
    e = (norm_weight.float() * (e * torch.rsqrt(e.square().mean(-1, keepdim=True) + eps))).to(out_dtype)
    angle = ((pos0 // m) * m).float().view(-1, 1, 1) * freqs.float()                  # [B, 1, half]
    return rope_(e.unsqueeze(1), *cos_sin(angle))[:, 0]


def compress_steps(kv: torch.Tensor, score: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
                   pos0: torch.Tensor, ratio: int, overlap: bool, norm_weight: torch.Tensor, eps: float,
                   freqs: torch.Tensor, out_dtype: torch.dtype, ape: torch.Tensor | None = None) -> torch.Tensor:
    """S decode tokens per row through a compressor, one after another: `compress_step` for token t = 0 .. S-1
    (kv, score [B, S, coff*d]) at position pos0 + t, the state updated in place after each. Returns [B, S, d]: each
    token's compress_step entry (finished where the token completes its group)."""
    return torch.stack([compress_step(kv[:, t], score[:, t], state_kv, state_score, pos0 + t, ratio, overlap,
                                      norm_weight, eps, freqs, out_dtype, ape) for t in range(kv.shape[1])], 1)
