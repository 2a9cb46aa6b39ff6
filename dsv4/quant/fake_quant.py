"""The reference's inference-time quantisation simulation (docs/architecture.md#fake-quantisation).

The official model keeps these round trips at inference because it was trained with them (QAT):
KV nope dims through FP8 e4m3 in 1x64 blocks, indexer q/keys through a Hadamard rotation and FP4 e2m1
in 1x32 blocks. Scales are powers of two (UE8M0), chosen so that the block maximum never clips.
"""
from __future__ import annotations

import functools

import torch

from .formats import FP4_MAX, FP8_MAX, e2m1_round


def _pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(x)))


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[..., n] -> fp32 [..., ceil(n / block), block], zero-padding a partial last block."""
    pad = -x.shape[-1] % block
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    return xf.unflatten(-1, (-1, block))


def _unblocks(q: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return q.flatten(-2)[..., :like.shape[-1]].to(like.dtype)


def fp8_fake_quant(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """x -> e4m3(x / s) * s per `block` channels, s = 2**ceil(log2(max(amax, 1e-4) / 448)). Same dtype as x."""
    xb = _blocks(x, block)
    s = _pow2_ceil(xb.abs().amax(-1, keepdim=True).clamp(min=1e-4) / FP8_MAX)
    q = (xb / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return _unblocks(q * s, x)


def fp4_fake_quant(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x -> e2m1(x / s) * s per `block` channels, s = 2**ceil(log2(max(amax, 6 * 2**-126) / 6)). Same dtype."""
    xb = _blocks(x, block)
    s = _pow2_ceil(xb.abs().amax(-1, keepdim=True).clamp(min=FP4_MAX * 2.0 ** -126) / FP4_MAX)
    q = e2m1_round((xb / s).clamp(-FP4_MAX, FP4_MAX))
    return _unblocks(q * s, x)


@functools.lru_cache(maxsize=8)
def _sylvester(n: int, device: str) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h * n ** -0.5).to(device)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Sylvester-ordered Walsh-Hadamard transform over the last dim (a power of two); >= fp32 math."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"hadamard needs a power-of-two last dim, got {n}")
    dt = torch.promote_types(x.dtype, torch.float32)
    return (x.to(dt) @ _sylvester(n, str(x.device)).to(dt)).to(x.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: exactly the quantised value; backward: the gradient passes to the unquantised input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q in the forward pass, identity gradient to x (the STE of quantisation-aware training)."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return q
    return _StraightThrough.apply(x, q)
