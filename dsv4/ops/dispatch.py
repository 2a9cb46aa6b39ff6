"""Which implementation of an op serves a call: the registry of backends, the modes that steer the choice, `_pick`.

Each backend package (reference/, triton/, invariant/, grouped/, gathered/, compiled/) registers its
implementations here when it is imported, each with a predicate saying whether it takes a call's arguments. A call
gets the backend named by its `backend=` argument, else by $DSV4_BACKEND, else (`auto`): inside
`batch_invariant()`, for CUDA tensors, the op's "invariant" implementation where one takes the call; otherwise the
first of triton, grouped, gathered, compiled, reference that does.

The modes are process-wide values, not context variables: the activation-checkpoint recomputation of a training
step runs in autograd's backward thread, which must see the mode its forward ran under.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

# op name -> backend name -> (implementation, predicate saying whether it can run these arguments)
_REGISTRY: dict[str, dict[str, tuple[Callable, Callable[..., bool]]]] = {}
_AUTO_ORDER = ("triton", "grouped", "gathered", "compiled", "reference")


def _always(*args, **kwargs) -> bool:
    return True


def register(op: str, backend: str, fn: Callable, supports: Callable[..., bool] = _always, *,
             under_autocast: bool = False) -> None:
    """Make `fn` the `backend` implementation of `op`. Ops choose their own precision (the references compute in
    fp32), so autocast is off inside fn unless `under_autocast` (the model's activation-dtype matmuls, which
    autocast casts as it casts nn.Linear)."""
    _REGISTRY.setdefault(op, {})[backend] = (fn if under_autocast else _outside_autocast(fn), supports)


def available_backends(op: str) -> list[str]:
    return sorted(_REGISTRY.get(op, {}))


_batch_invariant = False


@contextmanager
def batch_invariant(on: bool = True) -> Iterator[None]:
    """Batch-invariant mode on (or off) inside the block: a sequence's logits do not depend on which other
    sequences share its batch (CUDA tensors only; see ops/invariant). The mode is one value for the whole
    process, set here and restored on leaving the block (also on an exception), not a context variable:
    activation-checkpoint recomputation runs in autograd's backward thread and must see the same mode.

        with dsv4.ops.batch_invariant():
            logits = model(tokens, cache=cache)
    """
    global _batch_invariant
    before, _batch_invariant = _batch_invariant, bool(on)
    try:
        yield
    finally:
        _batch_invariant = before


TRAINING_KERNELS = ("triton", "compiled")
_training_kernels: str | None = None  # None: from the environment


def training_kernel_choice() -> str:
    """The kernels training calls run on a GPU: "triton" (the Triton training kernels where one exists) or
    "compiled" (the torch.compile'd references). Set by `training_kernels`; by default "triton" unless
    $DSV4_TRITON_TRAIN is 0. ($DSV4_COMPILE=0 keeps the references eager, whichever is chosen.)"""
    if _training_kernels is not None:
        return _training_kernels
    return "compiled" if os.environ.get("DSV4_TRITON_TRAIN", "1") == "0" else "triton"


class training_kernels:
    """Choose the training kernels, "triton" or "compiled" (see training_kernel_choice). Like
    torch.set_grad_enabled: called, it sets the choice for the process; as a `with` block, the choice before it
    comes back on leaving (also on an exception). One process-wide value, for the same reason as
    batch_invariant: recomputation in the backward thread must run the kernels its forward ran.

        with dsv4.ops.training_kernels("compiled"):
            loss.backward()
    """

    def __init__(self, choice: str):
        if choice not in TRAINING_KERNELS:
            raise ValueError(f"training kernels {choice!r}: choose from {list(TRAINING_KERNELS)}")
        global _training_kernels
        self.before, _training_kernels = _training_kernels, choice

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        global _training_kernels
        _training_kernels = self.before


def _pick(op: str, backend: str | None, *args, exclude: tuple[str, ...] = (), **kwargs) -> Callable:
    """The implementation of `op` for these arguments (see the module docstring for the order)."""
    impls = _REGISTRY[op]
    choice = backend or os.environ.get("DSV4_BACKEND") or "auto"
    if choice != "auto":
        if choice not in impls:
            raise ValueError(f"backend {choice!r} has no {op}; available: {sorted(impls)}")
        return impls[choice][0]
    if _batch_invariant and "invariant" in impls and _on_cuda(args):
        fn, supports = impls["invariant"]
        if supports(*args, **kwargs):
            return fn
    for name in _AUTO_ORDER:
        if name in impls and name not in exclude and impls[name][1](*args, **kwargs):
            return impls[name][0]
    raise RuntimeError(f"no backend of {op} supports these inputs")


def _on_cuda(args: tuple) -> bool:
    """Whether the call's (first) tensor is on a CUDA device."""
    return next((a.is_cuda for a in args if isinstance(a, torch.Tensor)), False)


def _outside_autocast(fn: Callable) -> Callable:
    """fn with autocast turned off for the device of its first tensor argument (`__wrapped__` is fn)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch._C._is_any_autocast_enabled():   # (inference: one check, not a walk over the arguments)
            return fn(*args, **kwargs)
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        if not torch.is_autocast_enabled(dev):
            return fn(*args, **kwargs)
        with torch.autocast(dev, enabled=False):
            return fn(*args, **kwargs)
    return run
