"""Routed experts for decode-sized batches: matrix-vector products that read each selected expert's weights in
place (forward only).

A decode step routes a handful of tokens to k experts each; the work is reading those experts' weights once.
One program computes a block of output rows of one (token, slot) pair, streaming the rows of the pair's
expert. The first kernel fuses the gate and up projections with the clamped SwiGLU and the routing weight;
the second applies the down projection and sums each token's slots. No gather copies the weights, no host
sync, two launches; each token's arithmetic is independent of the batch (batch-invariant mode runs it for any
number of pairs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_PAIRS = 16  # (token, slot) pairs; beyond, several pairs share experts and grouped GEMMs read less


@triton.jit
def _gate_up_kernel(x_ptr, w1_ptr, w3_ptr, e_ptr, rw_ptr, h_ptr, F, C, k, limit,
                    sw_e, sw_f, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr, CLAMP: tl.constexpr,
                    DENSE: tl.constexpr):
    p = tl.program_id(0)                       # pair = token * k + slot
    rows = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    rmask = rows < F
    e = 0 if DENSE else tl.load(e_ptr + p).to(tl.int64)  # DENSE: one expert, weight 1, every token
    g = tl.zeros([BLOCK_F], tl.float32)
    u = tl.zeros([BLOCK_F], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < C
        xv = tl.load(x_ptr + (p // k) * C + cs, mask=cmask, other=0.0).to(tl.float32)
        off = e * sw_e + rows[:, None] * sw_f + cs[None, :]
        m2 = rmask[:, None] & cmask[None, :]
        g += tl.sum(tl.load(w1_ptr + off, mask=m2, other=0.0).to(tl.float32) * xv[None, :], 1)
        u += tl.sum(tl.load(w3_ptr + off, mask=m2, other=0.0).to(tl.float32) * xv[None, :], 1)
    # the reference rounds the projections to the activation dtype before the fp32 SwiGLU
    g = g.to(h_ptr.dtype.element_ty).to(tl.float32)
    u = u.to(h_ptr.dtype.element_ty).to(tl.float32)
    if CLAMP:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    h = g / (1.0 + tl.exp(-g)) * u
    if not DENSE:
        h = h * tl.load(rw_ptr + p)
    tl.store(h_ptr + p * F + rows, h.to(h_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _down_kernel(h_ptr, w2_ptr, e_ptr, y_ptr, C, F, k, sw_e, sw_c,
                 BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, DENSE: tl.constexpr):
    n = tl.program_id(0)                       # token: its k slots are summed here, in slot order
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < C
    acc = tl.zeros([BLOCK_R], tl.float32)
    for j in range(k):
        p = n * k + j
        e = 0 if DENSE else tl.load(e_ptr + p).to(tl.int64)
        for f0 in range(0, F, BLOCK_F):
            fs = f0 + tl.arange(0, BLOCK_F)
            fmask = fs < F
            hv = tl.load(h_ptr + p * F + fs, mask=fmask, other=0.0).to(tl.float32)
            w = tl.load(w2_ptr + e * sw_e + rows[:, None] * sw_c + fs[None, :],
                        mask=rmask[:, None] & fmask[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * hv[None, :], 1)
    tl.store(y_ptr + n * C + rows, acc.to(y_ptr.dtype.element_ty), mask=rmask)


def _block_f(pairs: int, F: int) -> int:
    """Rows of w1/w3 per program: 32, fewer when that would leave the GPU under-filled (the shared expert at
    batch 1 is one pair: 32-row programs would be 64 streams for 132 SMs)."""
    bf = 32
    while bf > 8 and pairs * triton.cdiv(F, bf) < 512:
        bf //= 2
    return bf


def moe_experts(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, idx: torch.Tensor,
                weights: torch.Tensor, swiglu_limit: float, invariant: bool = False) -> torch.Tensor:
    """Same contract as ops.reference.experts.moe_experts. `invariant`: one row block for every batch (the
    block's shape sets how tl.sum splits a row's reduction across threads, so it must not follow the pair count)."""
    N, k = idx.shape
    E, F, C = w1.shape
    x = x.contiguous()
    w1, w2, w3 = (w.to(x.dtype).contiguous() for w in (w1, w2, w3))
    e = idx.reshape(-1).contiguous()  # int32 or int64, read as they are
    rw = weights.reshape(-1).float().contiguous()
    P = N * k
    h = torch.empty(P, F, dtype=x.dtype, device=x.device)
    bf = 16 if invariant else _block_f(P, F)
    _gate_up_kernel[(P, triton.cdiv(F, bf))](x, w1, w3, e, rw, h, F, C, k, float(swiglu_limit),
                                              w1.stride(0), w1.stride(1), BLOCK_F=bf, BLOCK_C=256,
                                              CLAMP=swiglu_limit > 0, DENSE=False, num_warps=4)
    y = torch.empty(N, C, dtype=torch.float32, device=x.device)
    # one token's slots are summed in one program: small row blocks keep hundreds of programs streaming weights
    _down_kernel[(N, triton.cdiv(C, 8))](h, w2, e, y, C, F, k, w2.stride(0), w2.stride(1),
                                         BLOCK_R=8, BLOCK_F=512, DENSE=False, num_warps=4)
    return y


def swiglu_expert(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, limit: float) -> torch.Tensor:
    """Same contract as ops.reference.experts.swiglu_expert: the routed kernels with one expert of weight 1 (the
    shared expert at decode: two launches instead of three matrix-vector products and ~6 elementwise kernels)."""
    N, C = x.shape
    F = w1.shape[0]
    x = x.contiguous()
    w1, w2, w3 = (w.to(x.dtype).contiguous() for w in (w1, w2, w3))
    h = torch.empty(N, F, dtype=x.dtype, device=x.device)
    bf = _block_f(N, F)
    _gate_up_kernel[(N, triton.cdiv(F, bf))](x, w1, w3, x, x, h, F, C, 1, float(limit), 0, w1.stride(0),
                                              BLOCK_F=bf, BLOCK_C=256, CLAMP=limit > 0, DENSE=True, num_warps=4)
    y = torch.empty(N, C, dtype=x.dtype, device=x.device)
    _down_kernel[(N, triton.cdiv(C, 8))](h, w2, x, y, C, F, 1, 0, w2.stride(0), BLOCK_R=8, BLOCK_F=512, DENSE=True,
                                         num_warps=4)
    return y


def supports_dense(x: torch.Tensor, w1: torch.Tensor) -> bool:
    return (x.is_cuda and x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16)
            and x.shape[0] <= MAX_PAIRS
            and not (torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad)))


def supports(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, idx: torch.Tensor, *a) -> bool:
    return supports_any_batch(x, w1, w2, w3, idx) and idx.numel() <= MAX_PAIRS


def supports_any_batch(x: torch.Tensor, w1: torch.Tensor, *a) -> bool:
    """The kernels' inputs for any number of pairs (batch-invariant mode: per pair, the same for any batch)."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and not (torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad)))


@triton.jit
def _swiglu_rows_kernel(g_ptr, u_ptr, rw_ptr, h_ptr, F, limit, BLOCK: tl.constexpr, CLAMP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    fs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = fs < F
    g = tl.load(g_ptr + row * F + fs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * F + fs, mask=m, other=0.0).to(tl.float32)
    if CLAMP:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    h = g / (1.0 + tl.exp(-g)) * u * tl.load(rw_ptr + row)
    tl.store(h_ptr + row * F + fs, h.to(h_ptr.dtype.element_ty), mask=m)


def swiglu_rows(gate: torch.Tensor, up: torch.Tensor, weights: torch.Tensor, limit: float) -> torch.Tensor:
    """h = swiglu(gate, up) * weights[:, None] (fp32 math) in gate.dtype: one pass instead of ~8 fp32 passes over
    [pairs, F] (grouped-GEMM experts in prefill)."""
    P, F = gate.shape
    h = torch.empty_like(gate)
    if P:
        _swiglu_rows_kernel[(P, triton.cdiv(F, 1024))](gate, up, weights.float().contiguous(), h, F, float(limit),
                                                       BLOCK=1024, CLAMP=limit > 0, num_warps=4)
    return h


@triton.jit
def _slot_sum_kernel(y_ptr, at_ptr, out_ptr, C, k, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cs < C
    acc = tl.zeros([BLOCK], tl.float32)
    for j in range(k):  # slot order, as the reference sums
        r = tl.load(at_ptr + n * k + j).to(tl.int64)
        acc += tl.load(y_ptr + r * C + cs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * C + cs, acc, mask=m)


def slot_sum(y: torch.Tensor, at: torch.Tensor, k: int) -> torch.Tensor:
    """out[n] = sum_j y[at[n * k + j]] in fp32: [N, C] from the expert-sorted rows y [N*k, C], without the fp32
    copy and the un-permuting gather of all rows."""
    C = y.shape[1]
    N = at.numel() // k
    out = torch.empty(N, C, dtype=torch.float32, device=y.device)
    if N:
        _slot_sum_kernel[(N, triton.cdiv(C, 1024))](y, at.contiguous(), out, C, k, BLOCK=1024, num_warps=4)
    return out
