"""Is an eager prefill forward host-bound? One forward of `--chunks` tokens on a cache that already holds
`--context` tokens of the same row (the serving engine's prefill-chunk and prefix-hit shapes), timed wall-clock
(synchronised) and profiled (torch.profiler: the kernels' summed time, the device's busy time, the number of
kernels), with the host syncs inside the forward counted (reads of device tensors; the ids go in from the host, as
the serving engine sends them, and are checked there). Wall much above busy means the forward waits on Python
(launches, syncs that drain the queue); wall near busy means the kernels themselves are the cost. A chunk of at
most 128 tokens (and the attention window) is also timed as the serving engine's padded step replayed from a CUDA
graph (`dsv4.serve.prefill_graphs`, `dsv4 serve --prefill-graphs`): `graph_ms`.

    python bench/prefill_profile.py --device cuda [--checkpoint /tmp/flash4] [--chunks 64 512 2048] [--context 32768]
    python bench/prefill_profile.py --device cpu --preset tiny --context 256 --chunks 16 64

Prints one line per chunk: wall ms, kernel ms, busy ms, kernels, syncs, busy / wall, graph ms; `--json FILE` writes
them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import dsv4

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from spec_step_count import SYNCS, device_summary  # noqa: E402  (the sync list and the profiler summary)


class SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts transfers of `device` tensors to the host (on a GPU each one drains the queue)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.n, self.device = 0, device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCS and args and getattr(args[0], "device", None) == self.device:
            self.n += 1
        return func(*args, **(kwargs or {}))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, context: list[int], chunk: list[int], device: torch.device, repeats: int) -> dict:
    """Wall, profile and syncs of model(chunk) on a fresh cache row holding `context`."""
    def fresh():
        cache = model.new_cache(1, len(context) + len(chunk) + 8)
        for i in range(0, len(context), 2048):
            model(torch.tensor([context[i:i + 2048]], device=device), cache=cache)
        return cache
    x = torch.tensor([chunk])   # (host ids: the engine's way)
    walls = []
    with torch.no_grad():
        for _ in range(repeats + 1):      # the first: warm-up (kernel compilation, allocator)
            cache = fresh()
            sync(device)
            t = time.perf_counter()
            model(x, cache=cache)
            sync(device)
            walls.append((time.perf_counter() - t) * 1e3)
        counter = SyncCounter(device)
        cache = fresh()
        with counter:
            model(x, cache=cache)
        out = {"chunk": len(chunk), "context": len(context), "wall_ms": round(min(walls[1:]), 3),
               "syncs": counter.n}
        if device.type == "cuda":
            cache = fresh()
            sync(device)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                model(x, cache=cache)
                sync(device)
            spans = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu = device_summary(spans, 1, top=8)
            out.update(kernel_ms=gpu.get("kernel_ms_per_step"), busy_ms=gpu.get("busy_ms_per_step"),
                       kernels=gpu.get("kernels_per_step"), top=gpu.get("top"))
            if out["busy_ms"]:
                out["busy_over_wall"] = round(out["busy_ms"] / out["wall_ms"], 3)
    out["graph_ms"] = graphed(model, context, chunk, device, repeats)
    return out


def graphed(model, context: list[int], chunk: list[int], device: torch.device, repeats: int) -> float | None:
    """Wall ms of the chunk as the engine's padded step (one eager call, the capture, then the timed replays, each
    appending the chunk once more), or None where the chunk does not fit one (or without CUDA graphs: eagerly)."""
    import numpy as np

    from dsv4.serve.prefill_graphs import PrefillGraphs
    n = len(chunk)
    probe = PrefillGraphs(model, model.new_cache(1, 8), 128)
    b = probe.bucket(n)
    if b is None:
        return None
    cache = model.new_cache(1, len(context) + (repeats + 3) * b + 8)
    with torch.no_grad():
        for i in range(0, len(context), 2048):
            model(torch.tensor([context[i:i + 2048]], device=device), cache=cache)
        graphs = PrefillGraphs(model, cache, n, cuda_graphs=True)
        ids = np.asarray(chunk, dtype=np.int64)
        walls = []
        for i in range(repeats + 2):
            sync(device)
            t = time.perf_counter()
            graphs.run(0, ids)
            sync(device)
            walls.append((time.perf_counter() - t) * 1e3)
    return round(min(walls[2:]), 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a checkpoint (e.g. bench/serve.py --make-checkpoint /tmp/flash4 made it)")
    p.add_argument("--preset", default="flash4", help="without --checkpoint: flash4 (bench/e2e.py) or a preset")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--chunks", type=int, nargs="+", default=[64, 512, 2048])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.checkpoint:
        model = dsv4.load_model(args.checkpoint, device=device,
                                dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    else:
        from e2e import flash4
        cfg = flash4() if args.preset == "flash4" else dsv4.ModelConfig.preset(args.preset)
        with torch.device(device):
            model = dsv4.Transformer(cfg).init_weights(seed=1)
        if device.type == "cuda":
            model = model.to_dtype(torch.bfloat16)
    model = model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, model.config.vocab_size, (args.context + max(args.chunks),), generator=g).tolist()
    rows = []
    for n in args.chunks:
        r = measure(model, ids[:args.context], ids[args.context:args.context + n], device, args.repeats)
        rows.append(r)
        print(f"chunk {n:6d} after {args.context} tokens: wall {r['wall_ms']:8.2f} ms"
              + (f", kernels {r['kernel_ms']:.2f} ms, busy {r['busy_ms']:.2f} ms, {r['kernels']:.0f} kernels, "
                 f"busy/wall {r.get('busy_over_wall')}" if 'busy_ms' in r else "") + f", syncs {r['syncs']}"
              + (f", padded graph step {r['graph_ms']:.2f} ms" if r.get("graph_ms") is not None else ""),
              flush=True)
        for name, ms, count in r.get("top") or []:
            print(f"    {ms:8.3f} ms {count:5.0f}x  {name[:90]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
