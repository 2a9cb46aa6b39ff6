"""Partial interleaved RoPE in place, one launch (forward only): each program rotates the rope channels of a
block of rows (token x head), reading the token's cos/sin once. The eager form is ~12 kernels per call."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, n_rows, heads, D, sign, sc_tok,
                 HALF: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < n_rows
    i = tl.arange(0, HALF)
    tok = rows // heads
    cos = tl.load(cos_ptr + tok[:, None] * sc_tok + i[None, :], mask=rm[:, None], other=1.0)
    sin = sign * tl.load(sin_ptr + tok[:, None] * sc_tok + i[None, :], mask=rm[:, None], other=0.0)
    # the row's rope channels are read and written as one contiguous run (vectorised), split into pairs in registers
    offs = rows.to(tl.int64)[:, None] * D + (D - 2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
    x = tl.load(x_ptr + offs, mask=rm[:, None], other=0.0)
    a, b = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_R, HALF, 2)))
    y = tl.reshape(tl.join(a * cos - b * sin, a * sin + b * cos), (BLOCK_R, 2 * HALF))
    tl.store(x_ptr + offs, y.to(x.dtype), mask=rm[:, None])


def token_angles(cos: torch.Tensor, sin: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B or 1, S, half] as contiguous fp32 [B, S, half] for x [B, S, ...]: one row per token."""
    shape = (x.shape[0], x.shape[1], cos.shape[-1])
    return cos.float().expand(shape).contiguous(), sin.float().expand(shape).contiguous()


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Same contract as ops.reference.rope.rope_ (x contiguous; cos/sin [B, S, half] for x [B, S, ..., D])."""
    half = cos.shape[-1]
    D = x.shape[-1]
    tokens = x.shape[0] * x.shape[1]
    heads = x.numel() // (tokens * D)
    cos, sin = token_angles(cos, sin, x)
    n_rows = tokens * heads
    block = 64
    _rope_kernel[(triton.cdiv(n_rows, block),)](x, cos, sin, n_rows, heads, D, -1.0 if inverse else 1.0, half,
                                               HALF=half, BLOCK_R=block, num_warps=4)
    return x


def supports(x: torch.Tensor, cos: torch.Tensor, *args) -> bool:
    half = cos.shape[-1]
    return (x.is_cuda and x.is_contiguous() and x.dim() >= cos.dim() and half & (half - 1) == 0
            and not (torch.is_grad_enabled() and x.requires_grad))
