"""One launch each of the FP4 weight-only GEMM (an expert's w1: N 2048, K 4096) and the FP8 weight-only GEMM
(N 8192, K 4096) at M = 1 and M = 16, inside a profiler range, for Nsight Compute. The kernels are compiled and run
three times first, so the profiled launches are warm.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section WarpStateStats --section LaunchStats --section Occupancy --section SchedulerStats \\
        python3 bench/ncu_packed_gemm.py [--fp4-decode old|bf16mul|after|words]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dsv4.ops.triton import packed_linear  # noqa: E402
from dsv4.quant.packed import Fp4GroupWeight, Fp8BlockWeight  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fp4-decode", choices=packed_linear.FP4_DECODES, default=packed_linear.FP4_DECODE)
    args = p.parse_args()
    packed_linear.FP4_DECODE = args.fp4_decode
    torch.manual_seed(0)
    dev = "cuda"
    w4 = Fp4GroupWeight.quantize(torch.randn(2048, 4096) / 64)
    w4 = Fp4GroupWeight(w4.data.to(dev), w4.scale.to(dev))
    w8 = Fp8BlockWeight.quantize(torch.randn(8192, 4096) / 64)
    w8 = Fp8BlockWeight(w8.data.to(dev), w8.scale.to(dev))
    xs = {m: torch.randn(m, 4096, device=dev, dtype=torch.bfloat16) for m in (1, 16)}
    for _ in range(3):
        for x in xs.values():
            packed_linear.linear_fp4_weight(x, w4)
            packed_linear.linear_fp8_weight(x, w8)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for m, x in xs.items():
        packed_linear.linear_fp4_weight(x, w4)
        packed_linear.linear_fp8_weight(x, w8)
        print(f"M={m}: FP4 config {packed_linear.gemm_config(m, 2048, 64, x.device)}, "
              f"FP8 config {packed_linear.gemm_config(m, 8192, 32, x.device, narrow=True)}")
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
