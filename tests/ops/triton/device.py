"""Where the kernel tests run and what they may expect there: natively on a CUDA GPU in bf16 at V4 sizes, else in
Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1) in fp32 at tiny sizes."""
from __future__ import annotations

import os

import torch

ON_GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if ON_GPU else "cpu"
DT = torch.bfloat16 if ON_GPU else torch.float32
TOL = 2e-2 if ON_GPU else 1e-5        # relative error of an inference kernel against the float64 reference
TRAIN_TOL = 1e-2 if ON_GPU else 1e-5  # ... of a training kernel's outputs and gradients
AGREE = 0.97 if ON_GPU else 0.999     # share of top-k choices the indexer agrees on (bf16 swaps near-ties)


def gen(seed: int = 0) -> torch.Generator:
    """The CPU generator a case draws its inputs from (the same inputs on either device)."""
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal values drawn on the CPU, on DEV in `dtype` (fp32 by default)."""
    return torch.randn(*shape, generator=g).to(DEV, dtype or torch.float32)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want| in float64 (Frobenius norms)."""
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of equal entries of two top-k index lists, each sorted along its last dim (order-free)."""
    return (torch.sort(a, -1).values == torch.sort(b, -1).values).float().mean().item()


def cases(cpu: list, gpu: list | None = None) -> list:
    """The parameter list for this machine: `gpu` where there is one (default: the CPU list)."""
    return gpu if ON_GPU and gpu is not None else cpu
