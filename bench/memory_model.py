"""The training memory model (dsv4.train.memory.step_memory) next to the peaks bench/e2e.py measured: one line per
training row of the given e2e result files, predicted vs measured GiB (torch.cuda.max_memory_allocated).

    python bench/memory_model.py bench/results/*_e2e*.json
    python bench/e2e.py --skip-peer --prefill --decode --decode-b64 --decode-fp8 --train 4096 \\
        --train-checkpointed 32768 65536 98304 131072 --train-kernels triton --json e2e_long.json
    python bench/memory_model.py e2e_long.json

The model describes the Triton training path (`--train-kernels triton`); the compiled references' rows are
printed too, for comparison.
"""
from __future__ import annotations

import argparse
import json

import dsv4
from dsv4.train.memory import step_memory


def flash4() -> dsv4.ModelConfig:
    """bench/e2e.py's benchmark model (imported from there it would need its provenance helpers)."""
    return dsv4.ModelConfig.preset("flash").replace(
        n_layers=4, compress_ratios=(4, 128, 4, 128), n_routed_experts=16, vocab_size=32768, n_hash_layers=0,
        n_mtp_layers=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="bench/e2e.py result files")
    a = p.parse_args()
    cfg = flash4()
    print(f"{'file':<44}{'row':<56}{'tokens':>8}{'measured':>10}{'predicted':>11}{'error':>8}")
    for path in a.results:
        with open(path) as f:
            rows = json.load(f)["results"]
        for r in rows:
            if not r["name"].startswith("dsv4 train") or r.get("cuda_graph") or "peak_gb" not in r:
                continue
            mem = step_memory(cfg, r["tokens"], param_bytes=2, optimizer=None,
                              recompute=bool(r.get("activation_checkpointing")))
            pred = mem.total / 2**30
            print(f"{path.rsplit('/', 1)[-1][:43]:<44}{r['name'][:55]:<56}{r['tokens']:>8}{r['peak_gb']:>9.1f}G"
                  f"{pred:>10.1f}G{100 * (pred / r['peak_gb'] - 1):>7.1f}%   ({mem.phase})")


if __name__ == "__main__":
    main()
