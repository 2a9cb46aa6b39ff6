"""Sweep of the Triton training attention's launch configurations (heads per program, rows per step, warps,
stages), one kernel at a time, at the 4K CSA and HCA shapes of bench/kernels.py: fwd+bwd milliseconds, so the
defaults in ops/triton/sequence_attn.py can be chosen from measurements. Writes JSON with --json.
--pick N runs only the N-th configuration of the sweep, so each can run in its own process (a kernel fault, an
illegal address say, leaves the CUDA context unusable for every later one):
    for i in $(seq 0 25); do python bench/train_attn_sweep.py --pick $i; done"""
from __future__ import annotations

import argparse
import json

import triton

from dsv4.ops.triton import sequence_attn as tri_seq
from kernels import train_attn_inputs  # bench/kernels.py: the same inputs as its training attention cases

SWEEP = {
    "_drows_kernel": [(64, 32, 8, 2), (64, 32, 8, 1), (64, 16, 8, 2), (32, 32, 8, 1), (32, 32, 4, 1), (16, 32, 4, 1),
                      (16, 32, 8, 1), (16, 64, 8, 1), (32, 64, 8, 1), (16, 16, 4, 1), (16, 64, 4, 2), (32, 16, 4, 2)],
    "_dq_kernel": [(64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2), (16, 64, 4, 1), (32, 64, 8, 1),
                   (16, 32, 8, 2), (32, 16, 4, 2)],
    "_fwd_kernel": [(64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2), (16, 64, 4, 1), (32, 64, 8, 1)],
}


def case(S: int, ratio: int, topk: int | None, W: int = 128):
    leaves, mask, do = train_attn_inputs(S, ratio, topk)
    D = leaves[0].shape[-1]

    def run():
        o, _ = tri_seq.sequence_attn(*leaves[:3], mask, leaves[3], D ** -0.5, W, return_entry_probs=True)
        o.backward(do)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json")
    p.add_argument("--pick", type=int, help="run only this configuration (index into the flattened sweep)")
    a = p.parse_args()
    cases = {"CSA 4K": case(4096, 4, 512), "HCA 4K": case(4096, 128, None)}
    default = dict(tri_seq.CONFIGS)
    out = []
    flat = [(kernel, cfg) for kernel, configs in SWEEP.items() for cfg in configs]
    for i, (kernel, cfg) in enumerate(flat):
        if a.pick is None or a.pick == i:
            tri_seq.CONFIGS.update(default)
            tri_seq.CONFIGS[kernel] = (cfg,)
            tri_seq._chosen.clear()
            row = {"kernel": kernel, "config": cfg}
            for name, run in cases.items():
                try:
                    row[name] = triton.testing.do_bench(run, warmup=3, rep=40, return_mode="median")
                except Exception as e:  # noqa: BLE001 - a configuration that does not fit: report it
                    row[name] = None
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            out.append(row)
            print(kernel, cfg, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()
                                if k not in ("kernel", "config")}, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
