"""The fp32-weight projections of a decode step (LM head, compressors, indexer compressors, routers: V4 keeps them
in fp32; ops.linear_fp32 runs them on the bf16 tensor cores as exact bf16 parts, ops/triton/linear.py) at decode
row counts, side by side in one run with what a user would otherwise call: torch.mm with fp32 output from bf16
operands (cuBLAS), F.linear in bf16 (bf16 output: not the same result) and the fp32 matmul; and the Triton kernel
over a few tile shapes, so that its decode configuration can be chosen from numbers.

    python bench/fp32_linear.py [--rows 1 8 64] [--out results.txt]

The shapes are those of the bench/e2e.py geometry (V4-Flash dims) whose weights hold bf16 values (one part, as
in a bf16 checkpoint). Each case is a CUDA graph calling the op on enough copies of the weight to overflow L2
(bench/native_gemm.py's timing); bandwidth = weight + activation + output bytes / time, against a copy measured
in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from native_gemm import copies, copy_bandwidth, rel_l2, timed  # noqa: E402
from provenance import result_path  # noqa: E402

from dsv4.ops.triton.launch import interpreted  # noqa: E402
from dsv4.ops.triton.linear import _split_mm_kernel, bf16_parts, linear_fp32  # noqa: E402

# (name, N, K) of the bench/e2e.py geometry: one LM head, and per layer the compressors' and routers' projections
SHAPES = (("head", 32768, 4096), ("csa compressor wkv/wgate", 1024, 4096), ("hca compressor wkv/wgate", 512, 4096),
          ("indexer compressor", 256, 4096), ("router", 16, 4096))
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) tried at decode rows besides the module's own choice
TILES = ((16, 32, 128, 4, 3), (16, 64, 256, 4, 3), (16, 32, 256, 4, 4), (16, 128, 128, 4, 3), (16, 64, 128, 8, 4))


def split_mm(x: torch.Tensor, parts: torch.Tensor, tile: tuple) -> torch.Tensor:
    bm, bn, bk, warps, stages = tile
    M, K = x.shape
    N = parts.shape[1]
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _split_mm_kernel[grid](x, parts, out, M, N, K, P=parts.shape[0], BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                           IEEE=interpreted(), num_warps=warps, num_stages=stages)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--out", help="result file (default bench/results/<date>_<device>_<commit>_fp32_linear.txt)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/fp32_linear.py times CUDA kernels: no GPU here")
    dev = "cuda"
    copy_gbps = copy_bandwidth(dev, True)
    lines = [f"# {torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s; us per call (fraction of copy "
             f"bandwidth); rel-L2 against the fp32 matmul"]
    totals: dict[tuple[int, str], float] = {}
    g = torch.Generator(device=dev).manual_seed(0)
    for name, N, K in SHAPES:
        w = (torch.randn(N, K, device=dev, generator=g) * 0.02).bfloat16().float()   # bf16 values, one part
        ws = copies(lambda i: w.clone(), N * K * 2, True)
        parts = [bf16_parts(t, trim=True) for t in ws]
        wb = [t.bfloat16() for t in ws]
        for M in a.rows:
            x = (torch.randn(M, K, device=dev, generator=g)).bfloat16()
            ref = x.float() @ w.t()
            io = M * K * 2 + M * N * 4
            cases = {"linear_fp32 (module)": lambda i: linear_fp32(x, ws[i]),
                     "torch.mm bf16->fp32": lambda i: torch.mm(x, wb[i].t(), out_dtype=torch.float32),
                     "F.linear bf16": lambda i: torch.nn.functional.linear(x, wb[i]),
                     "fp32 matmul": lambda i: x.float() @ ws[i].t()}
            for tile in TILES:
                cases[f"split_mm {tile}"] = (lambda t: lambda i: split_mm(x, parts[i], t))(tile)
            lines.append(f"## {name} [{N}, {K}], rows {M}")
            for label, fn in cases.items():
                try:
                    err = rel_l2(fn(0).float(), ref)
                    ms = timed(fn, len(ws), True)
                except Exception as e:  # a tile the compiler rejects (shared memory) is reported, not fatal
                    lines.append(f"  {label:36s} failed: {type(e).__name__}: {str(e)[:80]}")
                    continue
                gbps = (N * K * 2 + io) / ms / 1e6
                totals[(M, label)] = totals.get((M, label), 0.0) + ms
                lines.append(f"  {label:36s} {ms * 1e3:8.2f} us  ({gbps / copy_gbps:5.1%})  rel-L2 {err:.1e}")
            print("\n".join(lines[-len(cases) - 1:]), flush=True)
    lines.append("## one of each shape (a decode step has the head once and the others per layer)")
    for (M, label), ms in sorted(totals.items()):
        lines.append(f"  rows {M:3d} {label:36s} {ms * 1e3:8.2f} us")
    print("\n".join(lines[-len(totals) - 1:]))
    path = a.out or result_path("fp32_linear", "txt")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
