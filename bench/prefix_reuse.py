"""Prefill time saved by the on-disk prefix store on a long shared prefix (cold vs warm), same logits.

    python bench/prefix_reuse.py --preset small --prefix 4096 --suffix 64 [--device cuda] [--json out.json]

The numbers go to bench/results/<date>_<device>_<commit>_prefix_reuse.json unless --json names another file.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

import dsv4
from dsv4.generate import PrefixStore
from dsv4.generate.engine import _prefill
from provenance import record, result_path  # bench/provenance.py


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--prefix", type=int, default=4096)
    p.add_argument("--suffix", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--json", help="results file (default: bench/results/<date>_<device>_<commit>_prefix_reuse.json)")
    a = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    cfg = dsv4.ModelConfig.preset(a.preset)
    model = dsv4.Transformer(cfg).init_weights(seed=0).to_dtype(dtype).to(a.device).eval()
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, cfg.vocab_size, (a.prefix,), generator=g).tolist()
    first = shared + torch.randint(0, cfg.vocab_size, (a.suffix,), generator=g).tolist()
    second = shared + torch.randint(0, cfg.vocab_size, (a.suffix,), generator=g).tolist()
    n = len(second)
    with torch.no_grad(), tempfile.TemporaryDirectory() as d:
        store = PrefixStore(d, model, block=a.prefix)
        _prefill(model, model.new_cache(1, n), first[:256], 4096, False)   # warm-up (allocator, kernels)
        _sync(a.device)
        t = time.perf_counter()
        cold = _prefill(model, model.new_cache(1, n), second, 4096, False)
        _sync(a.device)
        t_cold = time.perf_counter() - t
        _prefill(model, model.new_cache(1, n), first, 4096, False, store)   # stores the shared prefix
        _sync(a.device)
        t = time.perf_counter()
        warm = _prefill(model, model.new_cache(1, n), second, 4096, False, store)
        _sync(a.device)
        t_warm = time.perf_counter() - t
    err = ((warm - cold).abs().max() / cold.abs().max()).item()
    res = {**record(a.device), "preset": a.preset,
           "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or "cpu",
           "dtype": a.dtype, "prefix_tokens": a.prefix, "suffix_tokens": a.suffix,
           "cold_prefill_s": t_cold, "warm_prefill_s": t_warm, "speedup": t_cold / t_warm,
           "rel_logit_err": err}
    print(f"{a.preset} on {res['device']} ({a.dtype}): {a.prefix}-token shared prefix + {a.suffix} new tokens: "
          f"cold {t_cold:.3f} s, warm {t_warm:.3f} s ({t_cold / t_warm:.1f}x), relative logit difference {err:.1e}")
    path = a.json or result_path("prefix_reuse", device=a.device)
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
