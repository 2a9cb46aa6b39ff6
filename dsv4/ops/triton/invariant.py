"""Matmul and row reduction with one fixed configuration (forward only), for batch-invariant mode.

Each output element of `matmul_nt` accumulates its K products in the same order (BLOCK_K steps, one tl.dot
per step, no split-K) whatever M is and wherever its row falls in a tile; `rms_rsqrt` reduces each row in
fixed BLOCK chunks. fp32 operands use IEEE fp32 products (no TF32), bf16/fp16 operands the tensor cores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mm_nt_kernel(a_ptr, w_ptr, c_ptr, M, N, K, sa_g, sa_m, sw_g, sw_n, sc_g, sc_m,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + g * sa_g + rm[:, None].to(tl.int64) * sa_m + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + g * sw_g + rn[:, None].to(tl.int64) * sw_n + rk[None, :],
                    mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        if IEEE:
            acc += tl.dot(a, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(w))
    tl.store(c_ptr + g * sc_g + rm[:, None].to(tl.int64) * sc_m + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul_nt(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a [..., K] @ w[N, K]^T -> [..., N], or batched a [G, M, K] with w [G, N, K] -> [G, M, N]; a.dtype out."""
    batched = w.dim() == 3
    w = w.to(a.dtype).contiguous()
    K, N = a.shape[-1], w.shape[-2]
    a2 = a.contiguous() if batched else a.reshape(-1, K).contiguous()
    G = w.shape[0] if batched else 1
    M = a2.shape[-2]
    out = torch.empty(*a2.shape[:-1], N, dtype=a.dtype, device=a.device)
    ieee = a.dtype == torch.float32
    bk = 32 if ieee else 64
    grid = (triton.cdiv(M, 64), triton.cdiv(N, 64), G)
    _mm_nt_kernel[grid](a2, w, out, M, N, K, M * K if batched else 0, K, N * K if batched else 0, K,
                        M * N if batched else 0, N, BLOCK_M=64, BLOCK_N=64, BLOCK_K=bk, IEEE=ieee,
                        num_warps=4, num_stages=2)
    return out if batched else out.view(*a.shape[:-1], N)


@triton.jit
def _rms_kernel(x_ptr, out_ptr, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], tl.float32)
    for d0 in range(0, D, BLOCK):
        cs = d0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * D + cs, mask=cs < D, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(out_ptr + row, 1.0 / tl.sqrt(tl.sum(acc, 0) / D + eps))


def rms_rsqrt(x: torch.Tensor, eps: float) -> torch.Tensor:
    """rsqrt(mean(x^2, -1) + eps) in fp32, keepdim: [..., 1]."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    _rms_kernel[(x2.shape[0],)](x2, out, x2.shape[1], eps, BLOCK=256, num_warps=2)
    return out.view(*x.shape[:-1], 1)
