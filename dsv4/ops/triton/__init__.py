"""Triton kernels for dsv4.ops (same signatures as ops/reference). Registered with the dispatcher when Triton
imports; `auto` picks them for CUDA tensors they support. Under TRITON_INTERPRET=1 they also run on the CPU
(slowly), which is how CI checks their logic."""
