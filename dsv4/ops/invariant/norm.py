"""RMS normalisation with a fixed-order row reduction (forward only), for batch-invariant mode: each row is
reduced in fixed BLOCK chunks by one program, whatever the number of rows."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import api


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Same contract as ops.reference.norm.rms_norm: the norm, then (rope) the op rope_ on its result."""
    if weight is None:
        y = x * rms_rsqrt(x, eps).to(x.dtype)
    else:
        xf = x.float()
        y = (weight.float() * (xf * rms_rsqrt(xf, eps))).to(x.dtype)
    return y if rope is None else api.rope_(y, *rope)
