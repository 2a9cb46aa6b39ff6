"""The fp32 matmul precision of a training run, set for the run only (a process-wide torch flag)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["fp32_matmuls"]


@contextmanager
def fp32_matmuls(choice: str) -> Iterator[None]:
    """CUDA fp32 matmuls on TF32 tensor cores ("tf32") or in full fp32 ("ieee") inside the block; the previous
    setting is back when it exits, by return or by exception."""
    if choice not in ("tf32", "ieee"):
        raise ValueError(f"fp32_matmul={choice!r}: choose 'tf32' or 'ieee'")
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = choice == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
