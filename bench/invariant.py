"""Batch-invariant GEMM (ops/invariant/linear.py) against the default torch GEMM at the V4-Flash bench projection
shapes, M = 1, 8, 64: median kernel time (CUDA-graph replay, as decode runs) and the weight read as a share of
the device-copy bandwidth measured in the same run; then the routed experts (256 x [2048, 4096] bf16, top-6) of
batch-invariant mode against the default choice, N = 1, 8, 64 tokens.

    python bench/invariant.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import dsv4
from dsv4.ops import dispatch
from dsv4.ops.invariant.linear import matmul_nt
from kernels import bench, bench_graph  # bench/kernels.py

# (name, N, K) of the bench geometry (hidden 4096)
SHAPES = [("wq_a", 1024, 4096), ("wq_b", 32768, 1024), ("wkv", 512, 4096), ("wo_b", 4096, 8192),
          ("shared w1", 2048, 4096), ("shared w2", 4096, 2048), ("head fp32", 129280, 4096)]


def copy_gbps() -> float:
    x = torch.empty(1 << 29, device="cuda", dtype=torch.uint8)
    y = torch.empty_like(x)
    return 2 * x.numel() / bench(lambda: y.copy_(x)) / 1e6


def main() -> None:
    bw = copy_gbps()
    print(f"{torch.cuda.get_device_name()}: copy {bw:.0f} GB/s")
    print(f"{'shape':>10} {'M':>3} {'invariant ms':>12} {'% copy bw':>9} {'torch ms':>9} {'% copy bw':>9}")
    for name, N, K in SHAPES:
        dt = torch.float32 if "fp32" in name else torch.bfloat16
        w = torch.randn(N, K, device="cuda").to(dt)
        for M in (1, 8, 64):
            a = torch.randn(M, K, device="cuda").to(dt)
            t_inv = bench_graph(lambda: matmul_nt(a, w))
            t_def = bench_graph(lambda: F.linear(a, w))
            mb = w.numel() * w.element_size() / 1e6   # MB per ms = GB/s
            print(f"{name:>10} {M:>3} {t_inv:12.4f} {100 * mb / t_inv / bw:9.1f} {t_def:9.4f} "
                  f"{100 * mb / t_def / bw:9.1f}")

    del w, a
    E, Fh, C, k = 256, 2048, 4096, 6
    w1, w3 = (torch.randn(E, Fh, C, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(2))
    w2 = torch.randn(E, C, Fh, device="cuda", dtype=torch.bfloat16) * 0.02
    print(f"{'experts N':>10} {'invariant ms':>12} {'default ms':>10}")
    for N in (1, 8, 64):
        x = torch.randn(N, C, device="cuda", dtype=torch.bfloat16)
        idx = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(N)])
        wts = torch.rand(N, k, device="cuda")
        args = (x, w1, w2, w3, idx, wts, 10.0)
        with torch.no_grad():
            with dsv4.ops.batch_invariant():
                inv = dispatch._pick("moe_experts", None, *args)
            default = dispatch._pick("moe_experts", None, *args)
            print(f"{N:>10} {bench_graph(lambda: inv(*args)):12.4f} {bench_graph(lambda: default(*args)):10.4f}")


if __name__ == "__main__":
    main()
