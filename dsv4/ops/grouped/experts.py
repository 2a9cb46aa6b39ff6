"""Routed experts as grouped GEMMs (`torch._grouped_mm`): (token, slot) pairs sorted by expert, one GEMM per
projection over all experts at once. Each expert's weights are read once, empty experts cost nothing, the
group sizes stay on the device (no host sync, so it runs inside CUDA graphs) and autograd works, so the same
path serves prefill, batched decode and training."""
from __future__ import annotations

import torch

from .. import compiled
from ..reference.experts import weighted_swiglu
from ..pair_order import pair_order

try:
    from ..triton.experts import slot_sum, swiglu_rows
except ImportError:  # no Triton: the eager elementwise path below
    slot_sum = swiglu_rows = None


class _ExpandRows(torch.autograd.Function):
    """x[tok]: each token's row once per slot, in expert order (tok = order // k). Backward: a token's k slot
    gradients summed by one gather kernel (autograd's index backward sorts and accumulates all N*k rows)."""

    @staticmethod
    def forward(ctx, x, tok, at, k):
        ctx.save_for_backward(at)
        ctx.k = k
        return x[tok]

    @staticmethod
    def backward(ctx, g):
        at, = ctx.saved_tensors
        return slot_sum(g.contiguous(), at, ctx.k).to(g.dtype), None, None, None


class _SlotSum(torch.autograd.Function):
    """sum_j y[at[n*k + j]] in fp32 from the expert-sorted rows (the adjoint of _ExpandRows): backward hands each
    row its token's gradient, one gather."""

    @staticmethod
    def forward(ctx, y, tok, at, k):
        ctx.save_for_backward(tok)
        ctx.dtype = y.dtype
        return slot_sum(y, at, k)

    @staticmethod
    def backward(ctx, g):
        tok, = ctx.saved_tensors
        return g.to(ctx.dtype)[tok], None, None, None


def moe_experts(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, idx: torch.Tensor,
                weights: torch.Tensor, swiglu_limit: float) -> torch.Tensor:
    """Same contract as ops.reference.experts.moe_experts."""
    N, k = idx.shape
    E = w1.shape[0]
    flat = idx.flatten().long()
    order, row_of, counts = pair_order(flat, E)                             # pairs grouped by expert, and back
    offs = counts.cumsum(0, dtype=torch.int32)                              # end row of each expert's group
    dt = x.dtype
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, w2, w3, weights))
    fused = slot_sum is not None and x.is_cuda  # Triton kernels for the row gathers and the slot sum
    tok = order // k                                                        # the token of each sorted row
    at = row_of.to(torch.int32) if fused else None                         # row of (token n, slot j) = at[n*k + j]
    xs = _ExpandRows.apply(x, tok, at, k) if fused else x[tok]              # [N*k, C]
    gate = torch._grouped_mm(xs, w1.to(dt).transpose(1, 2), offs=offs)      # [N*k, F]
    up = torch._grouped_mm(xs, w3.to(dt).transpose(1, 2), offs=offs)
    rw = weights.flatten()[order]
    if fused and not training:  # inference: fused passes, no fp32 copies
        y = torch._grouped_mm(swiglu_rows(gate, up, rw, swiglu_limit), w2.to(dt).transpose(1, 2), offs=offs)
        return slot_sum(y, at, k)
    h = (compiled.weighted_swiglu if compiled.training_on_gpu(gate) else weighted_swiglu)(gate, up, rw, swiglu_limit)
    y = torch._grouped_mm(h, w2.to(dt).transpose(1, 2), offs=offs)         # [N*k, C]
    if fused:
        return _SlotSum.apply(y, tok, at, k)
    return y.float()[row_of].view(N, k, -1).sum(1)


def supports(x: torch.Tensor, w1: torch.Tensor, *args) -> bool:
    """CUDA bf16 on Hopper or newer (the CUTLASS kernels), with 16-byte aligned rows."""
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and x.shape[-1] % 8 == 0 and w1.shape[1] % 8 == 0)
