"""One decode attention case, launched a few times, for a hardware-counter profile of the kernel:

    ncu --clock-control none -k regex:_sparse_attn --launch-skip 1 --launch-count 1 --set full \\
        python bench/ncu_case.py csa_b64

Cases are bench/kernels.py's (64 heads x 512, bf16): csa_b64 (128 window + 512 selected rows per query, batch 64),
hca_b64 (128 + 1024), csa_b1 (batch 1, split-K).
"""
from __future__ import annotations

import argparse

import torch

from dsv4.ops.triton import sparse_attn as tri_attn

CASES = {"csa_b64": (64, 128 + 512, 128 + 2048), "hca_b64": (64, 128 + 1024, 128 + 1024), "csa_b1": (1, 640, 4096)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("--launches", type=int, default=3)
    a = p.parse_args()
    B, K, N = CASES[a.case]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, 1, 64, 512, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(B, N, 512, device="cuda", dtype=torch.bfloat16, generator=g)
    sink = torch.randn(64, device="cuda")
    idx = torch.randint(0, N, (B, 1, K), device="cuda", generator=g, dtype=torch.int32)
    for _ in range(a.launches):
        tri_attn.sparse_attn(q, kv, sink, idx, 512 ** -0.5)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
