"""Packed FP8 / FP4 weights dequantised to a bf16 (or any float) tensor in one pass: each weight byte read once,
each value written once. The prefill path of the packed GEMMs: with hundreds of rows or more, a bf16 GEMM on a
scratch copy (cuBLAS / grouped CUTLASS) beats dequantising in registers inside small decode-shaped tiles, and the
copy costs 3 (FP8) or 2.5 (FP4) bytes per weight of traffic, small next to an M >= 256 GEMM's reads and FLOPs.

The values are exact (e4m3 / e2m1 times a power of two fit bf16), so the GEMM on the copy multiplies the same
numbers as the reference's dequantisation (Fp8BlockWeight.dequantize / Fp4GroupWeight.dequantize), bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...quant.packed import Fp4GroupWeight, Fp8BlockWeight
from .packed_bits import e2m1_as_fp16, e4m3_as_fp16, ue8m0_values

ROWS = 32  # weight rows per program (both kernels)


@triton.jit
def _fp8_kernel(w_ptr, s_ptr, out_ptr, N, K, rs_w, rs_s, ROWS: tl.constexpr):
    """One [ROWS, 128] piece of one 128x128 scale tile."""
    rn = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    kb = tl.program_id(1)
    rk = kb * 128 + tl.arange(0, 128)
    m = (rn < N)[:, None] & (rk < K)[None, :]
    b = tl.load(w_ptr + rn.to(tl.int64)[:, None] * rs_w + rk[None, :], mask=m, other=0).to(tl.int32)
    s = ue8m0_values(tl.load(s_ptr + (rn // 128) * rs_s + kb, mask=rn < N, other=0).to(tl.int32)) * 256.0
    v = e4m3_as_fp16(b).to(tl.float32) * s[:, None]   # e4m3_as_fp16 holds 2^-8 times the values
    tl.store(out_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :], v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _fp4_kernel(w_ptr, s_ptr, out_ptr, R, HALF, rs_w, rs_s, ROWS: tl.constexpr):
    """Rows [ROWS] x 64 bytes (128 values, 4 scale groups) of the flattened [R, K/2] codes."""
    rn = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    kh0 = tl.program_id(1) * 64
    byte = kh0 + tl.arange(0, 64)
    m = (rn < R)[:, None] & (byte < HALF)[None, :]
    b = tl.load(w_ptr + rn.to(tl.int64)[:, None] * rs_w + byte[None, :], mask=m, other=0).to(tl.int32)
    sc = tl.load(s_ptr + rn.to(tl.int64)[:, None] * rs_s + (byte // 16)[None, :], mask=m, other=0).to(tl.int32)
    s = ue8m0_values(sc + 14)      # 2^(scale - 127) * 2^14: e2m1_as_fp16 holds 2^-14 times the values
    lo = e2m1_as_fp16(b & 0xF).to(tl.float32) * s
    hi = e2m1_as_fp16(b >> 4).to(tl.float32) * s
    v = tl.reshape(tl.join(lo, hi), (ROWS, 128))      # k = 2 * byte (low nibble), 2 * byte + 1 (high)
    kk = 2 * kh0 + tl.arange(0, 128)
    tl.store(out_ptr + rn.to(tl.int64)[:, None] * (2 * HALF) + kk[None, :], v.to(out_ptr.dtype.element_ty),
             mask=(rn < R)[:, None] & (kk < 2 * HALF)[None, :])


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def dequant_fp8(w: Fp8BlockWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[N, K] values of w in `dtype` (equal to w.dequantize(dtype))."""
    N, K = w.shape
    data, scale = _rows_contiguous(w.data), _rows_contiguous(w.scale)
    out = torch.empty(N, K, dtype=dtype, device=data.device)
    if out.numel():
        _fp8_kernel[(triton.cdiv(N, ROWS), triton.cdiv(K, 128))](data, scale, out, N, K, data.stride(0),
                                                               scale.stride(0), ROWS=ROWS, num_warps=4)
    return out


def dequant_fp4(w: Fp4GroupWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[..., N, K] values of w in `dtype` (equal to w.dequantize(dtype)); the leading (expert) dims included."""
    shape = w.shape
    data = w.data.reshape(-1, w.data.shape[-1])     # a view when the expert stack is contiguous
    scale = w.scale.reshape(-1, w.scale.shape[-1])
    data, scale = _rows_contiguous(data), _rows_contiguous(scale)
    R, half = data.shape
    out = torch.empty(*shape, dtype=dtype, device=data.device)
    if out.numel():
        _fp4_kernel[(triton.cdiv(R, ROWS), triton.cdiv(half, 64))](data, scale, out, R, half, data.stride(0),
                                                                  scale.stride(0), ROWS=ROWS, num_warps=4)
    return out
