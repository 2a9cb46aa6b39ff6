"""What the Triton kernels' launchers share: where they run (interpreter, SM count), whether a call trains, and
the fallback to the reference where a kernel does not build."""
import functools
import os
import warnings
from typing import Callable

import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from ..dispatch import training_kernel_choice


def interpreted() -> bool:
    """Running under TRITON_INTERPRET=1 (the CPU interpreter, whose bf16 tl.dot is unreliable: kernels that
    would use one take the same exact products as IEEE fp32 dots there)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def training_kernels_enabled() -> bool:
    """The Triton training kernels (whole-sequence attention, mHC mixes; forward and backward) instead of the
    compiled references, unless dsv4.ops.training_kernels chose "compiled". Measured on the H100 (bench/e2e.py,
    4-layer V4-Flash geometry): a 4K training step 1.2x faster and 16% less memory, a 64K step 6.9x faster."""
    return training_kernel_choice() == "triton"


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """SMs of a tensor's CUDA device (1 elsewhere: the interpreter): how launchers size their grids to fill it."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def autograd_tracks(*inputs) -> bool:
    """A training call: autograd records and some tensor among `inputs` (None and non-tensors allowed) needs a
    gradient."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)


def reference_grads(reference: Callable, tensors: tuple, grad: torch.Tensor) -> tuple:
    """Gradients of reference(*tensors) for the output gradient `grad` (None for None inputs): how a backward
    kernel that cannot run here is replaced, by recomputing the reference under autograd."""
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_() for t in tensors]
        got = iter(torch.autograd.grad(reference(*leaves), [t for t in leaves if t is not None], grad))
    return tuple(None if t is None else next(got) for t in leaves)


def falls_back_to(reference: Callable) -> Callable[[Callable], Callable]:
    """Run `reference` with the same arguments, with a warning, where the decorated kernel launcher does not
    compile or fit on this GPU or Triton version (kernels checked on Hopper with Triton 3.6 and under the
    interpreter may not build elsewhere). DSV4_TRITON_STRICT=1 (set by the test suite) raises instead."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (CompilationError, OutOfResources) as e:
                if os.environ.get("DSV4_TRITON_STRICT") == "1":  # the tests: a kernel that does not build fails
                    raise
                warnings.warn(f"Triton {fn.__name__} unavailable here ({type(e).__name__}); using the reference",
                              RuntimeWarning, stacklevel=2)
                return reference(*args, **kwargs)
        return run
    return wrap
