"""Training sequence lengths rounded up to a multiple of a bucket on a GPU, so a post-training run meets few shapes.

Why: SFT rows are as long as their longest packed row and GRPO / distillation batches as their longest trajectory,
so nearly every step has a new length. On a GPU each new length can compile again: torch.compile'd references
recompile (tens of seconds each), and Triton specialises its kernels on whether integer arguments divide by 16.
Rounded up to a multiple of 64, lengths take a handful of values, all divisible by 16 (and by the compressors'
ratios 4 and 64). The padding is masked out of every loss (its targets are IGNORE or off the policy mask; attention
is causal, so it changes no earlier position); it does count in the indexer's KL mean and the expert loads.
On the CPU nothing compiles, so nothing is padded there by default.
"""
from __future__ import annotations

import torch

__all__ = ["GPU_BUCKET", "bucketed", "resolve_bucket"]

GPU_BUCKET = 64


def bucketed(n: int, bucket: int) -> int:
    """n rounded up to a multiple of `bucket` (n itself for a bucket of 0 or 1)."""
    return n if bucket <= 1 else -(-n // bucket) * bucket


def resolve_bucket(setting: int, device: torch.device | str) -> int:
    """A config's `length_bucket`: as set, or (0, auto) GPU_BUCKET on a CUDA device and 1 (none) elsewhere."""
    if setting < 0:
        raise ValueError(f"length_bucket must be >= 0, got {setting}")
    if setting:
        return setting
    return GPU_BUCKET if torch.device(device).type == "cuda" else 1
