"""How this backend (and the cache's record codecs) torch.compile functions: lazily, with room for every shape a
run meets, and never in a way that stops a call from running."""
from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch


def compile_enabled() -> bool:
    """DSV4_COMPILE=0 keeps everything eager (e.g. to debug, or where compilation is unavailable)."""
    return os.environ.get("DSV4_COMPILE", "1") != "0"


def lazily_compiled(fn: Callable) -> Callable:
    """fn compiled on its first call (so importing dsv4 compiles nothing)."""
    compiled = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, dynamic=None)
        # a training run meets a handful of shapes per op (sequence chunks, layer kinds): room for them all, so no
        # call falls back to eager (a recomputation must run the same graph as its forward)
        with torch._dynamo.config.patch(recompile_limit=64):
            return compiled(*args, **kwargs)
    return run


def compiled_or_eager(fn: Callable) -> Callable:
    """fn torch.compile'd on its first call, or fn itself while DSV4_COMPILE=0; if compiling it fails (an
    unsupported PyTorch build, say), a warning and fn from then on: for optimisations that must never be the
    reason a call cannot run (the cache's record codecs). The failures are kept in `.failed`."""
    compiled, failed = lazily_compiled(fn), []

    @functools.wraps(fn)
    def run(*args):
        if not failed and compile_enabled():
            try:
                return compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure: say so once, then run eager
                failed.append(e)
                warnings.warn(f"torch.compile of {fn.__name__} failed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); running it eagerly")
        return fn(*args)
    run.failed = failed
    return run


_compile_training: bool | None = None   # None: compile_enabled()


class training_compile:
    """Whether training calls on a GPU run the torch.compile'd references ("compiled" backend) where no Triton
    training kernel takes them (True), or the eager references (False): a process-wide value like
    dsv4.ops.training_kernels, usable as a call or a `with` block (the value before it comes back on leaving).
    Why off: a small model's run whose stages last seconds to a minute pays Inductor's compilation (tens of
    seconds per new shape) before its first step; inference (the cache's record codecs) is not affected.

        with dsv4.ops.training_compile(False):
            loss.backward()
    """

    def __init__(self, on: bool):
        global _compile_training
        self.before, _compile_training = _compile_training, bool(on)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        global _compile_training
        _compile_training = self.before


def training_compiled() -> bool:
    """The current training_compile choice; by default compile_enabled() (DSV4_COMPILE)."""
    return compile_enabled() if _compile_training is None else _compile_training and compile_enabled()


def training_on_gpu(*args, **kwargs) -> bool:
    """CUDA tensors that autograd tracks (a training forward), unless DSV4_COMPILE=0 or training_compile(False)."""
    if not training_compiled() or not torch.is_grad_enabled():
        return False
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return bool(tensors) and tensors[0].is_cuda and any(t.requires_grad for t in tensors)
