"""Where a CUDA-graphed decode step's GPU time goes, kernel by kernel, at each batch size: the 4-layer
V4-Flash-geometry model of bench/e2e.py, `--rows` rows prefilled with `--context` random tokens each, then graph
replays of one decode step under torch.profiler.

    python bench/decode_kernels.py [--rows 1 64] [--context 1024] [--steps 20] [--top 25]
    python bench/decode_kernels.py --prefill 8192 [--prefill-rows 1 8]   # prefill: R rows of 8192 / R tokens each

For each row count: the step's wall time without the profiler, the GPU's busy time per step, and the kernels
grouped by name (time per step, share of the busy time, launches per step), each also put in a class (MoE experts,
attention, GEMM, norm/elementwise, ...) so that what grows from 1 row to 64 stands out. Also the bytes of the
model's parameters and the bandwidth a step would need to read them once in its wall time.
`--prefill N` profiles instead one eager prefill forward of N tokens split over R rows (R sequences of N / R tokens
into an empty cache of R rows), the serving engine's batched prefill at the model level, so that a prefill of
8 x 1K can be set against one of 1 x 8K kernel by kernel.
Writes bench/results/<date>_<device>_<commit>_decode_kernels.txt (or _prefill_kernels.txt; or --out).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import build_model  # noqa: E402
from provenance import result_path  # noqa: E402

CLASSES = (("expert", "experts"), ("moe", "experts"), ("group", "experts"), ("sparse_attn", "attention"),
           ("attn", "attention"), ("indexer", "indexer"), ("compress", "compressor"), ("gemm", "gemm"),
           ("matmul", "gemm"), ("cutlass", "gemm"), ("sm90", "gemm"), ("nvjet", "gemm"), ("norm", "norm"),
           ("sinkhorn", "mhc"), ("mhc", "mhc"), ("rope", "rope"), ("topk", "routing"), ("sort", "routing"),
           ("route", "routing"), ("elementwise", "elementwise"), ("reduce", "reduce"), ("copy", "copy"))


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((c for key, c in CLASSES if key in low), "other")


def profile_rows(model, rows: int, context: int, steps: int) -> tuple[float, dict, float]:
    """(wall ms per replayed step, {kernel name: (total us over `steps`, launches)}, busy us per step)."""
    from dsv4.generate.graphs import GraphDecoder
    from torch.profiler import ProfilerActivity, profile
    g = torch.Generator().manual_seed(rows)
    vocab = model.config.vocab_size
    cache = model.new_cache(rows, context + 3 * steps + 16)
    with torch.no_grad():
        last = torch.cat([model(torch.randint(0, vocab, (1, context), generator=g).cuda(), cache=cache.select(i),
                                last_only=True)[:, -1].argmax(-1) for i in range(rows)])
        dec = GraphDecoder(model, cache)
        tokens = last
        for _ in range(3):   # eager warm-up, capture
            tokens = dec(tokens).argmax(-1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            tokens = dec(tokens).argmax(-1)
        torch.cuda.synchronize()
        wall = 1e3 * (time.perf_counter() - t) / steps
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                tokens = dec(tokens).argmax(-1)
            torch.cuda.synchronize()
    return (wall,) + _kernels(prof, steps)


def profile_prefill(model, rows: int, tokens: int, steps: int) -> tuple[float, dict, float]:
    """As profile_rows, for one prefill forward of `tokens` tokens as `rows` rows of tokens // rows."""
    from torch.profiler import ProfilerActivity, profile
    g = torch.Generator().manual_seed(rows)
    n = tokens // rows
    ids = torch.randint(0, model.config.vocab_size, (rows, n), generator=g).cuda()

    def once() -> None:
        cache = model.new_cache(rows, n + 8)
        model(ids, cache=cache, last_only=True)
    with torch.no_grad():
        for _ in range(2):   # compilation, autotuning
            once()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            once()
        torch.cuda.synchronize()
        wall = 1e3 * (time.perf_counter() - t) / steps
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                once()
            torch.cuda.synchronize()
    return (wall,) + _kernels(prof, steps)


def _kernels(prof, steps: int) -> tuple[dict, float]:
    """({kernel name: [total us, launches]}, busy us per step) of a profile over `steps` steps."""
    kernels: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    spans = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower() \
                and "memset" not in e.name.lower():
            kernels[e.name][0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            kernels[e.name][1] += 1
            spans.append((e.time_range.start, e.time_range.end))
    spans.sort()
    busy, end = 0.0, float("-inf")
    for s, e_ in spans:   # union of kernel intervals
        if e_ > end:
            busy += e_ - max(s, end)
            end = e_
    return dict(kernels), busy / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--prefill", type=int, default=0, help="profile a prefill of this many tokens instead")
    p.add_argument("--prefill-rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--out")
    a = p.parse_args()
    model = build_model()
    param_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    out = a.out or result_path("prefill_kernels" if a.prefill else "decode_kernels", "txt")
    what = f"prefill of {a.prefill} tokens" if a.prefill else f"decode at context {a.context}"
    lines = [f"# {torch.cuda.get_device_name()}, flash4 (bf16, random weights), {what}; parameters "
             f"{param_bytes / 1e9:.2f} GB"]
    for rows in a.prefill_rows if a.prefill else a.rows:
        if a.prefill:
            wall, kernels, busy = profile_prefill(model, rows, a.prefill, max(2, a.steps // 5))
        else:
            wall, kernels, busy = profile_rows(model, rows, a.context, a.steps)
        steps = max(2, a.steps // 5) if a.prefill else a.steps
        total = sum(t for t, _ in kernels.values()) / steps
        rate = f", {a.prefill / wall * 1e3:,.0f} tok/s" if a.prefill else ""
        lines.append(f"\n## rows {rows}: step {wall:.3f} ms (no profiler{rate}), GPU busy {busy / 1e3:.3f} ms/step, "
                     f"kernel time {total / 1e3:.3f} ms/step, {sum(n for _, n in kernels.values()) // steps} "
                     f"launches/step; reading every parameter once in the step's time: "
                     f"{param_bytes / (wall * 1e-3) / 1e12:.2f} TB/s")
        by_class: dict[str, float] = collections.defaultdict(float)
        for name, (t, _) in kernels.items():
            by_class[kernel_class(name)] += t / steps
        lines.append("by class: " + ", ".join(f"{c} {us / 1e3:.3f} ms ({100 * us / total:.0f}%)"
                                             for c, us in sorted(by_class.items(), key=lambda kv: -kv[1])))
        lines.append(f"{'us/step':>9} {'share':>6} {'n/step':>6}  kernel")
        for name, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:a.top]:
            lines.append(f"{t / steps:9.1f} {100 * t / steps / total:5.1f}% {n / steps:6.1f}  {name[:110]}")
        print("\n".join(lines[-(a.top + 3):]), flush=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
