"""Where a CUDA-graphed decode step's GPU time goes, kernel by kernel, at each batch size: the 4-layer
V4-Flash-geometry model of bench/e2e.py, `--rows` rows of `--context` random tokens (bench/e2e.py's warm_decoder:
one row prefilled, then copied), then graph replays of one decode step under torch.profiler.

    python bench/decode_kernels.py [--rows 1 64] [--context 1024] [--steps 20] [--top 25]
    python bench/decode_kernels.py --prefill 8192 [--prefill-rows 1 8]   # prefill: R rows of 8192 / R tokens each
    python bench/decode_kernels.py --native [--rows 1 64]   # the same model in the official formats, held natively

For each row count: the step's wall time without the profiler, the GPU's busy time per step, and the kernels
grouped by name (time per step, share of the kernel time, launches per step), each also put in a class (MoE experts,
attention, GEMM, norm/elementwise, ...) so that what grows from 1 row to 64 stands out. Also the bytes of the
model's parameters and the bandwidth a step would need to read them once in its wall time.
`--prefill N` profiles instead one eager prefill forward of N tokens split over R rows (R sequences of N / R tokens
into an empty cache of R rows), the serving engine's batched prefill at the model level, so that a prefill of
8 x 1K can be set against one of 1 x 8K kernel by kernel.
`--native` profiles the same random model written in the official formats (FP4 routed experts, FP8 projections;
bench/native_model.py's write_official) and loaded with its weights held natively, as `dsv4 serve` holds them.
Writes bench/results/<date>_<device>_<commit>_decode_kernels.txt (or _prefill_kernels.txt; or --out).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import build_model, warm_decoder  # noqa: E402
from provenance import result_path  # noqa: E402
from spec_step_count import device_summary  # noqa: E402  (kernel, busy and per-name times from profiler spans)

CLASSES = (("expert", "experts"), ("moe", "experts"), ("group", "experts"), ("sparse_attn", "attention"),
           ("attn", "attention"), ("indexer", "indexer"), ("compress", "compressor"), ("gemm", "gemm"),
           ("matmul", "gemm"), ("cutlass", "gemm"), ("sm90", "gemm"), ("nvjet", "gemm"), ("norm", "norm"),
           ("sinkhorn", "mhc"), ("mhc", "mhc"), ("rope", "rope"), ("topk", "routing"), ("sort", "routing"),
           ("route", "routing"), ("elementwise", "elementwise"), ("reduce", "reduce"), ("copy", "copy"))


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((c for key, c in CLASSES if key in low), "other")


def profiled(run: Callable[[], None], steps: int) -> tuple[float, dict]:
    """`run` (already warm) `steps` times timed, then `steps` times under torch.profiler: (wall ms per step,
    spec_step_count.device_summary of its kernels with every name)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        run()
    torch.cuda.synchronize()
    wall = 1e3 * (time.perf_counter() - t) / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    spans = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == DeviceType.CUDA]
    return wall, device_summary(spans, steps, top=len(spans))


@torch.no_grad()
def profile_decode(model, rows: int, context: int, steps: int) -> tuple[float, dict]:
    """A graphed decode step of `rows` rows at `context` tokens (`profiled`)."""
    _, step, nxt = warm_decoder(model, context, 2 * steps, rows, graphs=True)
    state = {"t": nxt}

    def run() -> None:
        state["t"] = step(state["t"]).argmax(-1)
    return profiled(run, steps)


@torch.no_grad()
def profile_prefill(model, rows: int, tokens: int, steps: int) -> tuple[float, dict]:
    """One prefill forward of `tokens` tokens as `rows` rows of tokens // rows into an empty cache (`profiled`)."""
    n = tokens // rows
    ids = torch.randint(0, model.config.vocab_size, (rows, n), generator=torch.Generator().manual_seed(rows)).cuda()

    def run() -> None:
        model(ids, cache=model.new_cache(rows, n + 8), last_only=True)
    for _ in range(2):   # compilation, autotuning
        run()
    return profiled(run, steps)


def native(model):
    """`model` written in the official formats to a temporary folder and loaded back with native weights."""
    import tempfile

    import dsv4
    from native_model import write_official   # bench/native_model.py
    with tempfile.TemporaryDirectory() as path:
        write_official(model, path)
        return dsv4.load_model(path, device=next(model.parameters()).device, weights="native").eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--prefill", type=int, default=0, help="profile a prefill of this many tokens instead")
    p.add_argument("--prefill-rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--native", action="store_true",
                   help="the model in the official formats (FP4 experts, FP8 projections), held natively")
    p.add_argument("--out")
    a = p.parse_args()
    model = build_model()
    if a.native:
        model = native(model)
    param_bytes = sum(t.numel() * t.element_size() for t in model.parameters()) + sum(
        t.numel() * t.element_size() for t in model.buffers())
    kind = "native" if a.native else ""
    out = a.out or result_path(("prefill_kernels" if a.prefill else "decode_kernels") + (f"_{kind}" if kind else ""),
                               "txt")
    what = f"prefill of {a.prefill} tokens" if a.prefill else f"decode at context {a.context}"
    weights = "official formats held natively" if a.native else "bf16"
    lines = [f"# {torch.cuda.get_device_name()}, flash4 ({weights}, random weights), {what}; parameters and "
             f"buffers {param_bytes / 1e9:.2f} GB"]
    steps = max(2, a.steps // 5) if a.prefill else a.steps
    for rows in a.prefill_rows if a.prefill else a.rows:
        if a.prefill:
            wall, dev = profile_prefill(model, rows, a.prefill, steps)
        else:
            wall, dev = profile_decode(model, rows, a.context, steps)
        total = dev["kernel_ms_per_step"]
        rate = f", {a.prefill / wall * 1e3:,.0f} tok/s" if a.prefill else ""
        lines.append(f"\n## rows {rows}: step {wall:.3f} ms (no profiler{rate}), "
                     f"GPU busy {dev['busy_ms_per_step']:.3f} ms/step, kernel time {total:.3f} ms/step, "
                     f"{dev['kernels_per_step']:.0f} launches/step; "
                     f"reading every parameter once in the step's time: {param_bytes / (wall * 1e-3) / 1e12:.2f} TB/s")
        by_class: dict[str, float] = collections.defaultdict(float)
        for name, ms, _ in dev["top"]:
            by_class[kernel_class(name)] += ms
        lines.append("by class: " + ", ".join(f"{c} {ms:.3f} ms ({100 * ms / total:.0f}%)"
                                             for c, ms in sorted(by_class.items(), key=lambda kv: -kv[1])))
        lines.append(f"{'us/step':>9} {'share':>6} {'n/step':>6}  kernel")
        for name, ms, n in dev["top"][:a.top]:
            lines.append(f"{1e3 * ms:9.1f} {100 * ms / total:5.1f}% {n:6.1f}  {name}")
        print("\n".join(lines[-(a.top + 3):]), flush=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
