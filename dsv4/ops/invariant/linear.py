"""The model's matrix products with one fixed kernel configuration (forward only), for batch-invariant mode.

Each output element of `matmul_nt` accumulates its K products in the same order (BLOCK_K steps, one tl.dot
per step, no split-K) whatever M is and wherever its row falls in a tile. fp32 operands use IEEE fp32
products (no TF32), bf16/fp16 operands the tensor cores.
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


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Same contract as ops.reference.linear.linear (w cast to x's dtype)."""
    return matmul_nt(x, w)


def grouped_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Same contract as ops.reference.linear.grouped_linear: one batched launch of per-group GEMMs."""
    B, S, G, _ = x.shape
    y = matmul_nt(x.permute(2, 0, 1, 3).flatten(1, 2), w)                  # [G, B*S, R]
    return y.unflatten(1, (B, S)).permute(1, 2, 0, 3)                       # [B, S, G, R]


def linear_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Same contract as ops.reference.linear.linear_fp32."""
    return matmul_nt(x.float(), w.float())
