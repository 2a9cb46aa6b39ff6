"""Where a step's GPU time goes, kernel by kernel, with the op, input shapes and dsv4 source line that launched it.

    python bench/profile_step.py [--train 4096] [--top 45] [--out profile.txt]

The report goes to bench/results/<date>_<device>_<commit>_profile_train<tokens>.txt unless --out names another file.

The 4-layer V4-Flash-geometry model of bench/e2e.py. A plain per-kernel table (as `e2e.py --profile` writes) says
that an fp32 SIMT GEMM costs 8 ms; this one says which line of dsv4 (or which autograd node) asked for it, with
which shapes. Also: the step's wall time without the profiler, and the lines that synchronise with the host.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from e2e import build_model, timed, train_step  # noqa: E402
from provenance import result_path  # noqa: E402


def _origin(evt) -> str:
    """The innermost dsv4 source line on the launching op's Python stack (or its autograd node in backward)."""
    node = evt
    while node is not None:
        for frame in node.stack or ():
            if "/dsv4/" in frame and "/ops/dispatch.py" not in frame:
                return frame.split("/dsv4/")[-1]
        if node.name.startswith("autograd::engine::evaluate_function:"):
            return node.name.split(":")[-1].strip()
        node = node.cpu_parent
    return "?"


def attributed_table(prof, top: int) -> str:
    """Kernel time grouped by (kernel, launching op with its input shapes, dsv4 origin), largest first."""
    rows: dict[tuple, list] = collections.defaultdict(lambda: [0.0, 0])
    total = 0.0
    for evt in prof.events():
        for k in evt.kernels:
            key = (k.name[:60], evt.name[:28], str(evt.input_shapes)[:70], _origin(evt)[:70])
            rows[key][0] += k.duration
            rows[key][1] += 1
            total += k.duration
    lines = [f"total GPU kernel time {total / 1000:.2f} ms in {sum(r[1] for r in rows.values())} kernels",
             f"{'ms':>8} {'%':>5} {'n':>4}  kernel | op | shapes | origin"]
    for key, (us, n) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{us / 1000:8.3f} {100 * us / total:5.1f} {n:4d}  " + " | ".join(key))
    return "\n".join(lines)


def gpu_busy(prof) -> str:
    """How much of the step's span the GPU spent running kernels: a step that is slower than its kernel time
    waits on the host (launch overhead, synchronising calls)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    if not spans:
        return "no GPU kernels"
    busy, (lo, hi) = 0.0, spans[0]
    start = lo
    for a, b in spans[1:]:
        if a > hi:
            busy, lo, hi = busy + hi - lo, a, b
        else:
            hi = max(hi, b)
    busy += hi - lo
    return f"GPU busy {busy / 1000:.1f} ms of a {(hi - start) / 1000:.1f} ms span ({100 * busy / (hi - start):.0f}%)"


def sync_points(fn) -> str:
    """The source lines whose calls made the host wait for the GPU during fn (torch's sync debug mode)."""
    import warnings
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    where = collections.Counter(f"{w.filename.split('/dsv4/')[-1]}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message))
    return "\n".join(f"{n:4d}  {loc}" for loc, n in where.most_common()) or "none"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=4096, help="tokens of the profiled training step (0: none)")
    p.add_argument("--top", type=int, default=45)
    p.add_argument("--out", help="report file (default: bench/results/<date>_<device>_<commit>_profile_train<N>.txt)")
    a = p.parse_args()
    model = build_model()
    tokens = torch.randint(0, model.config.vocab_size, (1, a.train + 1), device="cuda")
    report = []
    if a.train:
        for _ in range(2):  # compile, warm up
            train_step(model, tokens)
        walls = [timed(lambda: train_step(model, tokens))[1] for _ in range(3)]
        report.append(f"== training step wall time (3 runs, no profiler): "
                      + ", ".join(f"{1000 * w:.1f} ms" for w in walls))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True,
                     with_stack=True) as prof:
            train_step(model, tokens)
            torch.cuda.synchronize()
        report.append(f"== training fwd+bwd, {a.train} tokens\n{gpu_busy(prof)}\n" + attributed_table(prof, a.top))
        report.append("== host synchronisations in one training step (count, line)\n"
                      + sync_points(lambda: train_step(model, tokens)))
    text = "\n\n".join(report)
    print(text)
    path = a.out or result_path(f"profile_train{a.train}", "txt")
    with open(path, "w") as f:
        f.write(text + "\n")
    print(f"report: {path}")


if __name__ == "__main__":
    main()
