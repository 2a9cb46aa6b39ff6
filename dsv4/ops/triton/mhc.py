"""mHC lane arithmetic in one pass over the lanes (forward only, inference): the collapse sum_i w_i lane_i and
the post mix post_k f + sum_j comb[j, k] lane_j. The reference materialises fp32 copies of all R lanes several
times per call (on a prefill chunk, gigabytes per sublayer); here each lane element is read once, mixed in fp32
registers and written once in the activation dtype."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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
