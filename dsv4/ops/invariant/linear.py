"""The model's matrix products with one fixed kernel configuration (forward only), for batch-invariant mode.

A decode step multiplies a few rows by large weights: the work is reading the weights, which needs many programs
streaming in parallel. So K is cut into a fixed number of splits that depends on K alone (`split_k`), each
program computes a BLOCK_M x BLOCK_N tile over one split (one tl.dot per BLOCK_K step, fp32 accumulator), and a
second kernel sums a row's split partials in split order. The arithmetic of one output row is then fixed by K:
the same tile shape and K blocks, the same splits summed in the same order, whatever M is, wherever the row falls
in a tile and whatever the other rows hold (tl.dot's result for a row does not depend on the tile's other rows
for one BLOCK_M/BLOCK_N/BLOCK_K/num_warps configuration, and there is one). More rows only add tiles.

For many rows the partials would outgrow memory, so one program walks all the splits of its tile itself and
adds them in the same order (`_SPLIT_MAX_ROWS`): the same fp32 operations, the same bits (both start the sum at
+0.0, so even the sign of a zero agrees). fp32 operands use IEEE fp32 products (no TF32), bf16/fp16 operands
the tensor cores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N = 16, 64   # every M: a decode row's arithmetic never depends on the batch
_SPLIT_LEN = 512            # K elements per split at least ...
_MAX_SPLITS = 16            # ... and at most this many splits
_SPLIT_MAX_ROWS = 256       # above, one program walks all splits (no fp32 partials of every row)


def block_k(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float32 else 64


def split_k(K: int, bk: int) -> tuple[int, int]:
    """(splits, K elements per split) for a reduction of length K: a function of K (and the dtype's BLOCK_K)
    only, never of M. Splits are whole BLOCK_K steps, the last one possibly shorter."""
    splits = max(1, min(_MAX_SPLITS, K // _SPLIT_LEN))
    per = triton.cdiv(triton.cdiv(K, splits), bk) * bk
    return triton.cdiv(K, per), per


@triton.jit
def _tile_over_splits(a_ptr, w_ptr, rm, rn, M, N, K, K_PER, s_begin, s_end, sa_m, sw_n,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """sum over splits s_begin..s_end-1 (in order) of the split's fp32 tile product; shared with experts.py."""
    total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for s in range(s_begin, s_end):
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(s * K_PER, tl.minimum(s * K_PER + K_PER, K), BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rm[:, None] * sa_m + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                        other=0.0)
            w = tl.load(w_ptr + rn[:, None].to(tl.int64) * sw_n + rk[None, :],
                        mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
            if IEEE:
                acc += tl.dot(a, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(a, tl.trans(w))
        total += acc
    return total


@triton.jit
def _mm_nt_kernel(a_ptr, w_ptr, out_ptr, M, N, K, K_PER, SPLITS, sa_g, sa_m, sw_g, sw_n, so_s, so_g, so_m,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                  PARTIAL: tl.constexpr):
    # m tiles vary fastest: the programs reading one weight tile run together and share it through L2
    pid_m, pid_n, pid_z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if PARTIAL:   # one split per program, into the fp32 partials [SPLITS, G, M, N]
        g, s_begin, s_end = pid_z // SPLITS, pid_z % SPLITS, pid_z % SPLITS + 1
        out_ptr += s_begin.to(tl.int64) * so_s
    else:         # all splits in one program, into the output [G, M, N]
        g, s_begin, s_end = pid_z, 0, SPLITS
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    total = _tile_over_splits(a_ptr + g.to(tl.int64) * sa_g, w_ptr + g.to(tl.int64) * sw_g, rm.to(tl.int64), rn,
                              M, N, K, K_PER, s_begin, s_end, sa_m, sw_n, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
    tl.store(out_ptr + g.to(tl.int64) * so_g + rm[:, None].to(tl.int64) * so_m + rn[None, :], total.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, T, SPLITS, BLOCK: tl.constexpr):
    """out[i] = sum_s part[s, i] in split order, from +0.0 as _tile_over_splits sums."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < T
    total = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLITS):
        total += tl.load(part_ptr + s * T + i, mask=m, other=0.0)
    tl.store(out_ptr + i, total.to(out_ptr.dtype.element_ty), mask=m)


def sum_splits(part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (contiguous) = part [S, *out.shape] (fp32, contiguous) summed over S in order, in out's dtype."""
    T = out.numel()
    if T:
        _sum_splits_kernel[(triton.cdiv(T, 1024),)](part, out, T, part.shape[0], BLOCK=1024, num_warps=4)
    return out


def matmul_nt(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a [..., K] @ w[N, K]^T -> [..., N], or batched a [G, M, K] with w [G, N, K] -> [G, M, N]; a.dtype out.

    Each output row's arithmetic depends on K and the dtype only (see the module docstring)."""
    batched = w.dim() == 3
    w = w.to(a.dtype).contiguous()
    K, N = a.shape[-1], w.shape[-2]
    if w.shape[-1] != K:
        raise ValueError(f"matmul_nt: a has K={K} but w has {w.shape[-1]} columns")
    a2 = a.contiguous() if batched else a.reshape(-1, K).contiguous()
    G = w.shape[0] if batched else 1
    M = a2.shape[-2]
    out = torch.empty(*a2.shape[:-1], N, dtype=a.dtype, device=a.device)
    if out.numel() == 0 or K == 0:
        out.zero_()
        return out if batched else out.view(*a.shape[:-1], N)
    ieee = a.dtype == torch.float32
    bk = block_k(a.dtype)
    splits, per = split_k(K, bk)
    partial = splits > 1 and M * G <= _SPLIT_MAX_ROWS
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N), G * splits if partial else G)
    dst = torch.empty(splits, G, M, N, dtype=torch.float32, device=a.device) if partial else out
    _mm_nt_kernel[grid](a2, w, dst, M, N, K, per, splits, M * K if batched else 0, K, N * K if batched else 0, K,
                        G * M * N, M * N, N, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=bk, IEEE=ieee,
                        PARTIAL=partial, num_warps=4, num_stages=3)
    if partial:
        sum_splits(dst, out)
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
