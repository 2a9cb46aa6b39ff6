"""mHC lane arithmetic in one pass over the lanes (forward only, inference): the collapse sum_i w_i lane_i and
the post mix post_k f + sum_j comb[j, k] lane_j. The reference materialises fp32 copies of all R lanes several
times per call (on a prefill chunk, gigabytes per sublayer); here each lane element is read once, mixed in fp32
registers and written once in the activation dtype. `hc_mixes` computes the mixing logits fn . x / rms(x) from
the bf16 lanes directly, with exact fp32 products on the tensor cores (fn split into three bf16 parts)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .linear import bf16_parts


@triton.jit
def _collapse_kernel(x_ptr, w_ptr, y_ptr, C, R: tl.constexpr, RP: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.arange(0, RP)
    m = (r[:, None] < R) & (cs[None, :] < C)
    x = tl.load(x_ptr + t * R * C + r[:, None] * C + cs[None, :], mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + t * R + r, mask=r < R, other=0.0)
    tl.store(y_ptr + t * C + cs, tl.sum(w[:, None] * x, 0).to(y_ptr.dtype.element_ty), mask=cs < C)


@triton.jit
def _post_kernel(f_ptr, x_ptr, post_ptr, comb_ptr, out_ptr, C, R: tl.constexpr, RP: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    r = tl.arange(0, RP)
    x = tl.load(x_ptr + t * R * C + r[:, None] * C + cs[None, :], mask=(r[:, None] < R) & cm[None, :],
                other=0.0).to(tl.float32)
    f = tl.load(f_ptr + t * C + cs, mask=cm, other=0.0).to(tl.float32)
    for k in tl.static_range(R):
        col = tl.load(comb_ptr + t * R * R + r * R + k, mask=r < R, other=0.0)      # comb[:, k]
        y = tl.load(post_ptr + t * R + k) * f + tl.sum(col[:, None] * x, 0)
        tl.store(out_ptr + t * R * C + k * C + cs, y.to(out_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _mixes_kernel(x_ptr, w_ptr, part_ptr, ss_ptr, out_ptr, N, K, k_split, eps, M: tl.constexpr, MP: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FINAL: tl.constexpr, IEEE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    rm = rows < N
    ms = tl.arange(0, MP)
    acc = tl.zeros([BLOCK_N, MP], tl.float32)
    ss = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(split * k_split, (split + 1) * k_split, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :], mask=rm[:, None], other=0.0)
        xf = x.to(tl.float32)
        ss += tl.sum(xf * xf, 1)
        for p in tl.static_range(3):  # bf16 x times each bf16 part of fn: exact products, fp32 sums
            w = tl.load(w_ptr + p * MP * K + ms[None, :] * K + ks[:, None])
            if IEEE:  # the same exact products in fp32 FMAs (the CPU interpreter has no reliable bf16 dot)
                acc = tl.dot(xf, w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
    if FINAL:
        r = 1.0 / tl.sqrt(ss / K + eps)
        tl.store(out_ptr + rows[:, None] * M + ms[None, :], acc * r[:, None], mask=rm[:, None] & (ms[None, :] < M))
    else:
        tl.store(part_ptr + (split * N + rows[:, None]) * MP + ms[None, :], acc, mask=rm[:, None])
        tl.store(ss_ptr + split * N + rows, ss, mask=rm)


@triton.jit
def _mixes_reduce_kernel(part_ptr, ss_ptr, out_ptr, N, K, eps, SPLIT: tl.constexpr, M: tl.constexpr,
                         MP: tl.constexpr):
    row = tl.program_id(0)
    sp = tl.arange(0, SPLIT)
    ms = tl.arange(0, MP)
    # all parts in one load, summed in a fixed order: the result does not depend on the batch
    acc = tl.sum(tl.load(part_ptr + (sp[:, None] * N + row) * MP + ms[None, :]), 0)
    ss = tl.sum(tl.load(ss_ptr + sp * N + row), 0)
    r = 1.0 / tl.sqrt(ss / K + eps)
    tl.store(out_ptr + row * M + ms, acc * r, mask=ms < M)


def hc_mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as ops.reference.mhc.hc_mixes (x bf16 lanes [..., R, C], fn fp32 [M, R*C])."""
    *lead, R, C = x.shape
    K, M = R * C, fn.shape[0]
    x2 = x.reshape(-1, K)
    N = x2.shape[0]
    MP = max(16, triton.next_power_of_2(M))
    parts = bf16_parts(fn, MP)
    out = torch.empty(N, M, dtype=torch.float32, device=x.device)
    block_n, block_k = (16, 128) if N <= 64 else (64, 64)
    n_blocks = triton.cdiv(N, block_n)
    split = 1
    while split < 64 and n_blocks * split < 128 and (K // block_k) % (2 * split) == 0:
        split *= 2  # few rows (decode): spread K over the GPU, then sum the parts in a fixed order
    common = dict(M=M, MP=MP, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=os.environ.get("TRITON_INTERPRET") == "1",
                  num_warps=4)
    if split == 1:
        _mixes_kernel[(n_blocks, 1)](x2, parts, out, out, out, N, K, K, eps, FINAL=True, **common)
    else:
        part = torch.empty(split, N, MP, dtype=torch.float32, device=x.device)
        ss = torch.empty(split, N, dtype=torch.float32, device=x.device)
        _mixes_kernel[(n_blocks, split)](x2, parts, part, ss, out, N, K, K // split, eps, FINAL=False, **common)
        _mixes_reduce_kernel[(N,)](part, ss, out, N, K, eps, SPLIT=split, M=M, MP=MP, num_warps=4)
    return out.view(*lead, M)


def supports_mixes(x: torch.Tensor, fn: torch.Tensor, *args) -> bool:
    return (supports(x, fn) and x.dtype == torch.bfloat16 and x.is_contiguous()
            and (x.shape[-1] * x.shape[-2]) % 128 == 0 and fn.shape[0] <= 64 and x.numel() > 0)


def _grid(T: int, C: int, block: int) -> tuple[int, int]:
    return T, triton.cdiv(C, block)


def hc_collapse(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Same contract as ops.reference.mhc.hc_collapse."""
    *lead, R, C = x.shape
    x = x.contiguous()
    w = weights.float().contiguous()
    y = torch.empty(*lead, C, dtype=x.dtype, device=x.device)
    T = y.numel() // C
    _collapse_kernel[_grid(T, C, 1024)](x, w, y, C, R=R, RP=triton.next_power_of_2(R), BLOCK_C=1024, num_warps=4)
    return y


def hc_post(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Same contract as ops.reference.mhc.hc_post."""
    R, C = residual.shape[-2:]
    f, residual = f.contiguous(), residual.contiguous()
    post, comb = post.float().contiguous(), comb.float().contiguous()
    out = torch.empty(residual.shape, dtype=f.dtype, device=f.device)
    T = f.numel() // C
    _post_kernel[_grid(T, C, 1024)](f, residual, post, comb, out, C, R=R, RP=triton.next_power_of_2(R),
                                    BLOCK_C=1024, num_warps=4)
    return out


def supports(x: torch.Tensor, *args) -> bool:
    """CUDA tensors without autograd (training keeps the differentiable reference)."""
    return x.is_cuda and not (torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in (x, *args)))
