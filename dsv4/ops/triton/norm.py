"""RMS normalisation in one kernel (forward only, inference), optionally followed by the RoPE of the result's
trailing channels (the attention's q and kv: one kernel instead of two). The eager form is ~8 kernels (upcast,
square, mean, add, rsqrt, two products, downcast); a decode step runs ~30 norms, a prefill's per-head query norm
reads and writes [S, 64, 512] several times. Each row is read once, reduced in fp32 registers and written once.
Rows are reduced by one program in a fixed order, so the result does not depend on the batch."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rope import token_angles


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, cos_ptr, sin_ptr, n_rows, D, eps, rows_per_token, half,
                     WEIGHTED: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cs = tl.arange(0, BLOCK_D)
    m = (rows[:, None] < n_rows) & (cs[None, :] < D)
    offs = rows.to(tl.int64)[:, None] * D + cs[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    dt = x.dtype
    xf = x.to(tl.float32)
    if WEIGHTED:  # fp32 math, fp32 weight, one rounding at the end
        r = 1.0 / tl.sqrt(tl.sum(xf * xf, 1) / D + eps)
        w = tl.load(w_ptr + cs, mask=cs < D, other=0.0).to(tl.float32)
        y = w[None, :] * (xf * r[:, None])
    else:  # every step rounded to x's dtype, as the eager ops in that dtype do
        sq = (xf * xf).to(dt).to(tl.float32)
        ms = (tl.sum(sq, 1) / D).to(dt).to(tl.float32)
        r = (1.0 / tl.sqrt((ms + eps).to(dt).to(tl.float32))).to(dt).to(tl.float32)
        y = xf * r[:, None]
    if ROPE:  # the stored (rounded) result's channel pairs (2j, 2j+1) of the trailing `half` pairs, rotated
        a, b = tl.split(tl.reshape(y.to(dt).to(tl.float32), (BLOCK_R, BLOCK_D // 2, 2)))
        i = tl.arange(0, BLOCK_D // 2) - (D // 2 - half)             # rope pair index (>= 0 on the rope dims)
        on = (rows[:, None] < n_rows) & (i[None, :] >= 0) & (i[None, :] < half)
        at = (rows // rows_per_token).to(tl.int64)[:, None] * half + i[None, :]
        cos = tl.load(cos_ptr + at, mask=on, other=1.0)
        sin = tl.load(sin_ptr + at, mask=on, other=0.0)
        y = tl.reshape(tl.join(a * cos - b * sin, a * sin + b * cos), (BLOCK_R, BLOCK_D))
    tl.store(out_ptr + offs, y.to(dt), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Same contract as ops.reference.norm.rms_norm (rope: cos/sin [B, S, half] for x [B, S, ..., D])."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    out = torch.empty_like(x2)
    n = x2.shape[0]
    block_d = triton.next_power_of_2(D)
    block_r = max(1, min(64, 2048 // block_d))
    w = weight.contiguous() if weight is not None else x2
    cos = sin = x2
    per_token, half = 1, 0
    if rope is not None:
        half = rope[0].shape[-1]
        cos, sin = token_angles(*rope, x)
        per_token = n // (x.shape[0] * x.shape[1])
    _rms_norm_kernel[(triton.cdiv(n, block_r),)](x2, w, out, cos, sin, n, D, eps, per_token, half,
                                                 WEIGHTED=weight is not None, ROPE=rope is not None,
                                                 BLOCK_R=block_r, BLOCK_D=block_d,
                                                 num_warps=8 if block_d >= 2048 else 4)
    return out.view(x.shape)


def supports(x: torch.Tensor, weight: torch.Tensor | None, *args) -> bool:
    return (x.is_cuda and x.is_contiguous() and x.shape[-1] <= 16384 and x.numel() > 0
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and not (torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))))
