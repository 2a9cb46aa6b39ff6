"""Batch-invariant mode: a sequence's logits do not depend on which other sequences share its batch.

Library GEMMs and reductions pick their algorithm (tile shape, split-K, split reductions) from the problem
size, so the same row can be summed in a different order at batch 1 and at batch 64. In this mode every
matmul and row reduction of the model runs through Triton kernels with one fixed configuration per dtype
(ops.triton.invariant), the sparse attention never splits its index lists, and the routed experts always
run the per-pair kernel: each row's arithmetic is the same whatever the batch. Everything else in the model
is already per row. CUDA only (elsewhere the usual kernels run); slower than the default, meant for
reproducible evaluation and debugging.

    with dsv4.ops.batch_invariant():
        logits = model(tokens, cache=cache)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

_enabled = False


def enabled() -> bool:
    return _enabled


def set_batch_invariant(on: bool) -> None:
    global _enabled
    _enabled = bool(on)


@contextmanager
def batch_invariant(on: bool = True) -> Iterator[None]:
    """Turn batch-invariant mode on (or off) inside the block."""
    global _enabled
    before, _enabled = _enabled, bool(on)
    try:
        yield
    finally:
        _enabled = before


def linear(x, w):
    """x @ w^T with the fixed-configuration kernel (w [N, K], or [G, N, K] with x [G, M, K])."""
    from .triton.invariant import matmul_nt
    return matmul_nt(x, w)


def rms_rsqrt(x, eps: float):
    """rsqrt(mean(x^2, -1) + eps) in fp32 with keepdim, reduced in a fixed order."""
    from .triton.invariant import rms_rsqrt as kernel
    return kernel(x, eps)


def active(x) -> bool:
    """Whether a call on tensor x runs the batch-invariant kernels (mode on and x on a GPU)."""
    return _enabled and x.is_cuda
