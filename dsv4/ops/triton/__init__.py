"""Triton kernels for dsv4.ops (same signatures as ops/reference). Registered with the dispatcher when Triton
imports; `auto` picks them for CUDA tensors they support. Under TRITON_INTERPRET=1 they also run on the CPU
(slowly), which is how CI checks their logic."""
import os


def interpreted() -> bool:
    """Running under TRITON_INTERPRET=1 (the CPU interpreter, whose bf16 tl.dot is unreliable: kernels that
    would use one take the same exact products as IEEE fp32 dots there)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def training_kernels_opted_in() -> bool:
    """DSV4_TRITON_TRAIN=1: the Triton training kernels (whole-sequence attention, mHC mixes; forward and
    backward) replace the compiled references. Opt-in until their speed has been measured on a GPU
    (bench/kernels.py and bench/e2e.py time both)."""
    return os.environ.get("DSV4_TRITON_TRAIN") == "1"
