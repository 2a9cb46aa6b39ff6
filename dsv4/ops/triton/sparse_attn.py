"""Sparse attention over index lists with a per-head sink (forward; decode and prefill).

One program = one query token x a block of heads. It walks the query's index list in chunks of BLOCK_K,
gathers those K=V rows once for all heads of the block, and keeps an online softmax in fp32; the sink
joins the denominator at the end. Masked slots (index -1) contribute nothing. Rows are bf16 or fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sparse_attn_kernel(q_ptr, kv_ptr, sink_ptr, idx_ptr, o_ptr, scale,
                        S, H, K, N,
                        sq_b, sq_s, sq_h, skv_b, skv_n, si_b, si_s, so_b, so_s, so_h,
                        D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t = tl.program_id(0)            # token: b * S + s
    pid_h = tl.program_id(1)
    b = pid_t // S
    s = pid_t % S
    heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + s * sq_s + heads[:, None] * sq_h + d[None, :], mask=hmask[:, None], other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        rows = tl.load(idx_ptr + b * si_b + s * si_s + ks, mask=ks < K, other=-1).to(tl.int64)
        valid = rows >= 0
        kv = tl.load(kv_ptr + b * skv_b + tl.where(valid, rows, 0)[:, None] * skv_n + d[None, :],
                     mask=valid[:, None], other=0.0)                                  # [BLOCK_K, D]
        sc = tl.dot(q, tl.trans(kv)).to(tl.float32) * scale                          # [BLOCK_H, BLOCK_K]
        sc = tl.where(valid[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(sc - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv).to(tl.float32)
        m = m_new
    sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0).to(tl.float32)
    m_fin = tl.maximum(m, sink)
    corr = tl.exp(m - m_fin)
    den = l * corr + tl.exp(sink - m_fin)
    out = acc * (corr / den)[:, None]
    tl.store(o_ptr + b * so_b + s * so_s + heads[:, None] * so_h + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=hmask[:, None])


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
    """Same contract as ops.reference.attention.sparse_attn: q [B,S,H,D], kv [B,N,D], sink [H], idx [B,S,K]."""
    B, S, H, D = q.shape
    if D & (D - 1) or D < 16:
        raise ValueError(f"triton sparse_attn needs a power-of-two head dim >= 16, got {D}")
    if kv.dtype != q.dtype:
        kv = kv.to(q.dtype)
    q = q.contiguous()
    kv = kv.contiguous()
    idx = idx.to(torch.int32).contiguous()
    o = torch.empty_like(q)
    K = idx.shape[-1]
    # [BLOCK_H, D] fp32 accumulators must stay in registers: fewer heads per program for wide heads
    block_h = max(16, min(triton.next_power_of_2(H), 32 if D >= 256 else 64))
    block_k = 32 if D >= 256 else 64
    grid = (B * S, triton.cdiv(H, block_h))
    _sparse_attn_kernel[grid](q, kv, sink.float().contiguous(), idx, o, scale, S, H, K, kv.shape[1],
                              q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
                              idx.stride(0), idx.stride(1), o.stride(0), o.stride(1), o.stride(2),
                              D=D, BLOCK_H=block_h, BLOCK_K=block_k, num_warps=8 if D >= 256 else 4,
                              num_stages=2)
    return o


def supports(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor, scale: float) -> bool:
    D = q.shape[-1]
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and D >= 16 and not D & (D - 1) and D <= 512
