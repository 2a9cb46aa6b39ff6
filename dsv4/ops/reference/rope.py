"""Partial interleaved RoPE (docs/architecture.md#rope): the trailing 2*half channels rotate in pairs (2i, 2i+1)."""
from __future__ import annotations

import torch


def cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of fp32 angles; on the CPU evaluated in float64 and rounded to fp32. PyTorch's fp32 CPU cos
    (2.13) is off by up to ~2e-4 on part of a multithreaded tensor in some processes (seen in ~1 of 4 runs on
    [2, 300, 8] angles; sin and the float64 functions were right), which made a plain forward differ from the same
    forward through the cache. GPUs keep their fp32 functions (no such error seen; one kernel each per step)."""
    if angles.device.type != "cpu":
        return angles.cos(), angles.sin()
    a = angles.double()
    return a.cos().float(), a.sin().float()


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The trailing rope channels of x rotated by the angles (fp32 math), in x.dtype.

    x: [B, S, ..., D]; cos/sin: [B or 1, S, half] fp32, broadcast over the middle (head) dims."""
    half = cos.shape[-1]
    for _ in range(x.dim() - cos.dim()):
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if inverse:
        sin = -sin
    rope = x[..., -2 * half:].float().unflatten(-1, (half, 2))
    a, b = rope[..., 0], rope[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate x's rope channels in place; returns x."""
    x[..., -2 * cos.shape[-1]:] = rotated(x, cos, sin, inverse)
    return x


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x with its rope channels rotated, as a new tensor (differentiable): training's form of rope_."""
    return torch.cat((x[..., :-2 * cos.shape[-1]], rotated(x, cos, sin, inverse)), dim=-1)
