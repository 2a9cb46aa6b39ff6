"""Routed SwiGLU experts over FP4 weights (the official checkpoints' e2m1 experts with 1x32 UE8M0 scales), read as
bytes and dequantised in registers (ops/triton/packed_linear.py says how).

The (token, slot) pairs are sorted by expert on the device; one program per (used expert, block of output rows)
walks that expert's rows in 16- or 64-row tiles, so every expert's weights are read once per tile of its tokens, experts
without tokens get no program, and nothing waits on the host (CUDA-graph capturable). Two kernels:
gate/up (w1 and w3 in one pass, clamped SwiGLU and routing weight fused) and down (w2); the k slot outputs of a
token are then summed in fp32 in slot order (experts.slot_sum), as the reference sums them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...quant.packed import Fp4GroupWeight
from ..reference import packed as ref
from .experts import slot_sum
from .launch import falls_back_to, interpreted
from .packed_linear import fp4_dot_step

def _rows(pairs: int, experts: int) -> int:
    """Token rows per tile: 16 (the tensor-core minimum) while experts get few tokens on average (decode), 64 from
    16 per expert on, so that an expert's weights are decoded once per 64 of its tokens rather than per 16."""
    return 64 if pairs >= 16 * experts else 16


@triton.jit
def _rows_dot(a_ptr, rows, rmask, rs_a, w_ptr, s_ptr, rn, nmask, K, rs_w, rs_s, acc, DT: tl.constexpr,
              IEEE: tl.constexpr):
    """acc + a[rows] @ dequant(w[rn])^T over all of K (a rows at a_ptr + rows * rs_a; FP4 w)."""
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * rs_a
    for kh0 in range(0, K // 2, 64):
        acc = fp4_dot_step(acc, a_rows, rmask, kh0, K, w_ptr, s_ptr, rn, nmask, rs_w, rs_s, DT, IEEE)
    return acc


@triton.jit
def _expert_rows(active_ptr, offs_ptr):
    """(expert, first sorted row, end row) of this program's slot in the list of used experts; a slot past the
    used ones (-1) gets expert 0 and no rows."""
    e = tl.load(active_ptr + tl.program_id(0)).to(tl.int64)
    used = e >= 0
    e = tl.maximum(e, 0)
    start = tl.load(offs_ptr + e)
    end = tl.where(used, tl.load(offs_ptr + e + 1), start)
    return e, start, end


@triton.jit
def _gate_up_kernel(x_ptr, tok_ptr, rw_ptr, active_ptr, offs_ptr, w1_ptr, s1_ptr, w3_ptr, s3_ptr, h_ptr, F, C, limit,
                    we_stride, se_stride, rs_w, rs_s, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
                    CLAMP: tl.constexpr, IEEE: tl.constexpr):
    e, start, end = _expert_rows(active_ptr, offs_ptr)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < F
    DT = tl.float32 if IEEE else x_ptr.dtype.element_ty
    w1 = w1_ptr + e.to(tl.int64) * we_stride
    w3 = w3_ptr + e.to(tl.int64) * we_stride
    s1 = s1_ptr + e.to(tl.int64) * se_stride
    s3 = s3_ptr + e.to(tl.int64) * se_stride
    for r0 in range(start, end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < end
        tok = tl.load(tok_ptr + rows, mask=rmask, other=0)
        g = _rows_dot(x_ptr, tok, rmask, C, w1, s1, rn, nmask, C, rs_w, rs_s, tl.zeros([ROWS, BLOCK_N], tl.float32),
                      DT, IEEE)
        u = _rows_dot(x_ptr, tok, rmask, C, w3, s3, rn, nmask, C, rs_w, rs_s, tl.zeros([ROWS, BLOCK_N], tl.float32),
                      DT, IEEE)
        # as the reference: projections rounded to the activation dtype, then the SwiGLU in fp32
        g = g.to(h_ptr.dtype.element_ty).to(tl.float32)
        u = u.to(h_ptr.dtype.element_ty).to(tl.float32)
        if CLAMP:
            g = tl.minimum(g, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
        h = g / (1.0 + tl.exp(-g)) * u * tl.load(rw_ptr + rows, mask=rmask, other=0.0)[:, None]
        tl.store(h_ptr + rows.to(tl.int64)[:, None] * F + rn[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _down_kernel(h_ptr, active_ptr, offs_ptr, w2_ptr, s2_ptr, y_ptr, C, F, we_stride, se_stride, rs_w, rs_s,
                 BLOCK_N: tl.constexpr, ROWS: tl.constexpr, IEEE: tl.constexpr):
    e, start, end = _expert_rows(active_ptr, offs_ptr)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < C
    DT = tl.float32 if IEEE else h_ptr.dtype.element_ty
    w2 = w2_ptr + e.to(tl.int64) * we_stride
    s2 = s2_ptr + e.to(tl.int64) * se_stride
    for r0 in range(start, end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < end
        y = _rows_dot(h_ptr, rows, rmask, F, w2, s2, rn, nmask, F, rs_w, rs_s, tl.zeros([ROWS, BLOCK_N], tl.float32),
                      DT, IEEE)
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * C + rn[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & nmask[None, :])


def _sorted_pairs(idx: torch.Tensor, E: int):
    """(token of each expert-sorted pair, its position in the sorted order per pair, expert row offsets [E+1],
    the sort order, the used experts in order padded with -1 to min(E, pairs)), all on the device: the kernels'
    grids have one slot per possible used expert, a static size (CUDA graphs), and slots past the used experts
    exit at once, so decode's few experts do not cost a program per expert of the layer."""
    N, k = idx.shape
    flat = idx.reshape(-1).long()
    order = flat.argsort(stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=idx.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.zeros(E + 1, dtype=torch.int32, device=idx.device)
    offs[1:] = counts.cumsum(0)
    at = torch.empty_like(order)
    at[order] = torch.arange(order.numel(), device=idx.device)
    experts = flat[order]
    first = torch.ones_like(experts, dtype=torch.bool)
    first[1:] = experts[1:] != experts[:-1]
    active = torch.full((min(E, experts.numel()),), -1, dtype=torch.int32, device=idx.device)
    active.scatter_(0, first.cumsum(0) - 1, experts.to(torch.int32))  # each used expert's slot, once per pair
    return (order // k).to(torch.int32), at, offs, order, active


def _block_n(rows: int) -> int:
    """Output rows per program: 32 (decode: more programs streaming the few active experts), 64 for larger
    batches."""
    return 32 if rows <= 1024 else 64


@falls_back_to(ref.moe_experts_fp4)
def moe_experts_fp4(x: torch.Tensor, w1: Fp4GroupWeight, w2: Fp4GroupWeight, w3: Fp4GroupWeight, idx: torch.Tensor,
                    weights: torch.Tensor, swiglu_limit: float) -> torch.Tensor:
    """Same contract as ops.reference.packed.moe_experts_fp4: x [N, C], w1/w3 FP4 [E, F, C], w2 FP4 [E, C, F],
    idx / weights [N, k] -> fp32 [N, C]."""
    N, k = idx.shape
    E, F, C = w1.shape
    if x.shape != (N, C) or tuple(w3.shape) != (E, F, C) or tuple(w2.shape) != (E, C, F):
        raise ValueError(f"moe_experts_fp4: x {tuple(x.shape)}, w1 {w1.shape}, w3 {w3.shape}, w2 {w2.shape} do "
                         f"not fit [N, C], [E, F, C], [E, F, C], [E, C, F] with N={N} tokens")
    x = x.contiguous()
    tok, at, offs, order, active = _sorted_pairs(idx, E)
    rw = weights.reshape(-1)[order].float().contiguous()
    P = N * k
    h = torch.empty(P, F, dtype=x.dtype, device=x.device)
    y = torch.empty(P, C, dtype=x.dtype, device=x.device)
    if P == 0:
        return torch.zeros(N, C, dtype=torch.float32, device=x.device)
    d1, s1, d3, s3, d2, s2 = (t.contiguous() for t in (w1.data, w1.scale, w3.data, w3.scale, w2.data, w2.scale))
    bn = _block_n(P)
    slots, rows = active.numel(), _rows(P, E)
    _gate_up_kernel[(slots, triton.cdiv(F, bn))](x, tok, rw, active, offs, d1, s1, d3, s3, h, F, C,
                                                 float(swiglu_limit), d1.stride(0), s1.stride(0), d1.stride(1),
                                                 s1.stride(1), BLOCK_N=bn, ROWS=rows, CLAMP=swiglu_limit > 0,
                                                 IEEE=interpreted(), num_warps=4, num_stages=3)
    _down_kernel[(slots, triton.cdiv(C, bn))](h, active, offs, d2, s2, y, C, F, d2.stride(0), s2.stride(0),
                                              d2.stride(1), s2.stride(1), BLOCK_N=bn, ROWS=rows, IEEE=interpreted(),
                                              num_warps=4, num_stages=3)
    return slot_sum(y, at, k)


def supports(x: torch.Tensor, w1, w2, w3, idx: torch.Tensor) -> bool:
    """bf16 activations on a GPU, no autograd (inference weights)."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and x.dim() == 2 and w1.device == x.device
            and not (torch.is_grad_enabled() and x.requires_grad))
