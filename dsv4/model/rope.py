"""Partial, interleaved RoPE with the V4 YaRN frequency blend (docs/architecture.md#rope).

Only the trailing `rope_dim` channels of a head rotate; pairs are adjacent channels (2i, 2i+1).
Compressed layers use `compress_rope_theta` with YaRN; window-only layers plain `rope_theta`.
YaRN here changes only the frequencies: there is no attention-temperature (mscale) factor.
"""
from __future__ import annotations

import math

import torch

from .. import ops


def rope_frequencies(rope_dim: int, theta: float, factor: float = 1.0, original_seq_len: int = 0,
                     beta_fast: int = 32, beta_slow: int = 1) -> torch.Tensor:
    """Per-pair angular frequencies [rope_dim // 2] (fp32). `original_seq_len` 0 means plain RoPE."""
    freqs = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if original_seq_len > 0:
        def correction_dim(rotations: float) -> float:
            return rope_dim * math.log(original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))
        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        # ramp 0 (high-frequency pairs) keeps the frequency, ramp 1 divides it by `factor`
        freqs = freqs / factor * ramp + freqs * (1 - ramp)
    return freqs


def rope_angles(positions: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of positions x freqs: [..., rope_dim // 2] fp32, for any integer positions tensor."""
    return ops.cos_sin(positions.to(torch.float32).unsqueeze(-1) * freqs.to(positions.device))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the trailing 2*cos.shape[-1] channels of x (fp32 math, result in x.dtype), as a new tensor.

    x: [B, S, ..., D]; cos/sin: [B or 1, S, rope_dim // 2], broadcast over the middle (head) dims.
    `inverse` rotates by the negative angle (V4 de-rotates the attention output, since V = K carries RoPE).
    """
    return ops.rope(x, cos, sin, inverse)


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """apply_rope writing into x's rope channels when autograd does not track x (inference): the other 7/8 of
    the tensor is not copied (on a prefill's [S, 64, 512] queries that copy costs more than the rotation).
    Returns the rotated tensor (x itself, or a new tensor when x requires grad)."""
    if x.requires_grad and torch.is_grad_enabled():
        return apply_rope(x, cos, sin, inverse)
    return ops.rope_(x, cos, sin, inverse)
