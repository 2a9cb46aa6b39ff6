"""Partial interleaved RoPE in place, one launch: each program rotates the rope channels of a block of rows
(token x head), reading the token's cos/sin once. The eager form is ~12 kernels per call. Training's
differentiable form copies x and rotates the copy; its backward rotates a copy of the gradient back (the rotation
is orthogonal). The reference's concatenation of the untouched and rotated channels cost a 4K-token V4-Flash
training step ~13 ms (cat, slice backward with zero fill, fp32 products) for q and the de-rotated output alone."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import autograd_tracks, training_kernels_enabled


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


def _rotated_copy(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    return rope_(x.clone(memory_format=torch.contiguous_format), cos, sin, inverse)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, inverse):
        ctx.save_for_backward(cos, sin)
        ctx.inverse = inverse
        return _rotated_copy(x, cos, sin, inverse)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _rotated_copy(g, cos, sin, not ctx.inverse), None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Same contract as ops.reference.rope.rope (a new tensor; gradients for x)."""
    return _Rope.apply(x, cos, sin, inverse)


def _angles_fit(x: torch.Tensor, cos: torch.Tensor) -> bool:
    half = cos.shape[-1]
    return x.is_cuda and x.dim() >= cos.dim() and half & (half - 1) == 0


def supports_differentiable(x: torch.Tensor, cos: torch.Tensor, *args) -> bool:
    """CUDA tensors, unless the Triton training kernels are turned off (DSV4_TRITON_TRAIN=0)."""
    return _angles_fit(x, cos) and training_kernels_enabled()


def supports(x: torch.Tensor, cos: torch.Tensor, *args) -> bool:
    return _angles_fit(x, cos) and x.is_contiguous() and not autograd_tracks(x)
