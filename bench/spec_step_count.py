"""Count what one speculative decode step costs on the host, on any device (CPU is enough): the aten ops it runs
(each one a kernel launch on a GPU, eager), split by phase, the host syncs (tensor -> Python value: .tolist(),
.item(), int/float/bool of a tensor; a batched `to_host` of several tensors counts once) and the host -> device
tensor builds (torch.tensor(data, device=...): a blocking copy, which on a GPU waits for every queued kernel, so
counted as a sync; the pinned asynchronous ones apart). Compare with a plain decode step of the same engine. The CPU
reference MoE's own syncs (ops/reference, never used on a GPU) are left out. Launch-bound single-stream decoding
is as fast as these counts are small; on a GPU with CUDA graphs the plain step and the verify forward are one
replay each.

    python bench/spec_step_count.py [--preset tiny] [--n-draft 1] [--steps 6] [--prompt 40] [--breakdown] [--unfused]
                                    [--no-row] [--ops-as-kernels] [--graph-path]
    python bench/spec_step_count.py --device cuda --time-steps 200 [--preset small] [--dtype bf16] [--unfused]
                                    [--no-row] [--profile-steps 20] [--cprofile N]
    python bench/spec_step_count.py --time-steps 300 --stub-graphs [--preset small] [--cprofile N]
    python bench/spec_step_count.py --device cuda --dtype bf16 --preset small --time-steps 200 --n-draft 3 --pipelined

`--ops-as-kernels` counts each dsv4.ops call (and each cache record encode / decode) as one op and the aten ops of
its CPU reference not at all, which approximates a GPU's kernel launches (one Triton kernel per op for most; a few
for some, and compress_steps S + 1) where the plain count is inflated by the references' dozens of small ops.

`eager_on_gpu` counts the ops outside the phases a GPU run replays from CUDA graphs (GRAPHED below): the kernels
launched one by one around the replays. `--breakdown` lists each phase's op names ("eager:" marks the phases
outside graphs); `--unfused` adds the speculative step without the fused greedy verify (`mtp_unfused`), `--no-row`
the one without a single greedy row's whole-step graph (`mtp_no_row`: the MTP catch-up graph, then the fused verify
graph). `--graph-path` counts on the CUDA-graph path itself (on a CPU with no-op replays, bench/graph_stub.py, once
every graph is captured): every op counted then runs around the replays, eager on a GPU, and `replays` counts the
graph replays per step.

With --time-steps (a GPU run) it also times that many engine steps of each (CUDA graphs on, on engines of their
own, after 5 warm-up steps): milliseconds per step and per emitted token, the step's cost against a plain step's,
which graphs were captured, and the speed-up over plain decoding that this step cost gives at --acceptance. A random-init model's drafts are rarely accepted, so the
per-step time is the number to compare (the speculative step's cost against a plain step's); acceptance comes
from a trained checkpoint (bench/train_mtp.sh). Counting runs the steps under Python dispatch hooks, so the
counted steps run eagerly on a GPU too only where the engine itself would. (The aten counts miss the Triton
kernels, which do not dispatch through aten: `--ops-as-kernels` on a CPU counts them.)

Host or device: each timed step's `host_ms_per_step` is its wall time less its waits for the device results
(`wait_ms_per_step`; a step that waits most of its time is device-bound), `cpu_ms_per_step` the thread's CPU time
(a spinning wait counts there). On a GPU, `gpu` profiles `--profile-steps` more steps (torch.profiler: the kernels'
summed time, the device's busy time, the kernel count and the top kernels per step; the host's time in CUDA
runtime calls) and `gpu_replays` times each
captured graph alone (back-to-back replays). `--stub-graphs` (CPU) takes the CUDA-graph path with no-op replays
(bench/graph_stub.py): the timed steps are then the host's cost alone; it skips the counts. `--cprofile N` lists
the host's top functions over N more steps.

`--pipelined` (with --time-steps) also times a lone greedy row outside the engine, on one SpeculativeDecoder whose
single-row step replays one CUDA graph: `mtp_row_loop`, the steps one at a time as the engine's batched path runs
them (stage, replay, wait, bookkeeping: the host's work never overlaps the device's), and `mtp_row_stream`, the same
steps by `greedy_row_stream` (each launched before the previous one's results are read: the engine's path for a
lone greedy row), each with its host and wait ms per step and, on a GPU, `--profile-steps` more steps profiled.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import dsv4
import dsv4.ops.api as ops_api
from dsv4.cache import layout as cache_layout
try:
    from dsv4.generate import host as host_module
except ImportError:   # (a tree from before the one-wait speculative step: its syncs are all counted apart)
    host_module = None
from dsv4.generate import speculative
from dsv4.serve import engine as engine_module
from dsv4.serve.engine import Engine
from dsv4.serve.types import SamplingParams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from graph_stub import REPLAY_COUNT, graph_path, stubbed_graphs  # noqa: E402

REPLAYS = 20   # replay_times' back-to-back replays of each graph

SYNCS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
         torch.Tensor.__float__, torch.Tensor.__index__}


class HostCounter(TorchFunctionMode):
    """Counts tensor -> host transfers and tensors built from Python data."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCS:
            where = _callers()
            if not any("ops/reference" in f or name in ("to_host", "_to_host") for f, name in where):
                self.counts["sync:" + func.__name__] += 1
        elif func is torch.tensor:
            if (kwargs or {}).get("device") is not None:   # the model's device: on a GPU a blocking copy
                self.counts["sync:blocking_host_to_device"] += 1
            elif any(name in ("to_device", "_on_device") for _, name in _callers()):
                self.counts["async_host_to_device"] += 1
        return func(*args, **(kwargs or {}))


class OpCounter(TorchDispatchMode):
    """Counts aten ops (views and metadata ops excluded: they launch nothing)."""

    FREE = {"view", "_unsafe_view", "t", "transpose", "unsqueeze", "squeeze", "expand", "slice", "select",
            "permute", "as_strided", "alias", "detach", "reshape", "unbind", "split", "chunk", "lift_fresh",
            "_reshape_alias", "split_with_sizes", "empty", "empty_like", "empty_strided"}

    PHASES = ("accept_batch", "_mtp", "_draft", "checkpoint", "rollback", "rollback_on_device", "hidden", "step_rows",
              "_spec_view", "greedy_verify", "greedy_draft_verify")

    def __init__(self, ops_as_kernels: bool = False):
        super().__init__()
        self.ops = Counter()
        self.names = Counter()   # (phase, op name)
        self.ops_as_kernels = ops_as_kernels
        self.inside = 0          # > 0 while a dsv4.ops call (counted as one) runs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in self.FREE and not self.inside:
            self.count(name)
        return func(*args, **(kwargs or {}))

    def count(self, name: str) -> None:
        phase = _phase(self.PHASES)
        self.ops[phase] += 1
        self.names[phase, name] += 1

    def __enter__(self):
        if self.ops_as_kernels:
            self._saved = ops_api._pick, cache_layout._codec
            pick, codec = self._saved

            def one(name: str, fn):
                def call(*a, **k):
                    if not self.inside:
                        self.count(name)
                    self.inside += 1
                    try:
                        return fn(*a, **k)
                    finally:
                        self.inside -= 1
                return call
            ops_api._pick = lambda op, *a, **k: one("ops." + op, pick(op, *a, **k))
            cache_layout._codec = lambda fn, t: one("codec." + fn.__name__, codec(fn, t))
        return super().__enter__()

    def __exit__(self, *exc):
        if self.ops_as_kernels:
            ops_api._pick, cache_layout._codec = self._saved
        return super().__exit__(*exc)


# The phases a GPU run replays from CUDA graphs (engine.step on one stream, rows 0 .. bucket - 1): the plain step's
# forward (GraphDecoder); the MTP forwards (GraphStep: the catch-up of a single row and the further drafts); the
# unfused verify (GraphDecoder with checkpoint: checkpoint + forward + head) and its rollback (a second graph); the
# fused greedy step (`greedy_verify`, one GraphStep: checkpoint, forward, head, acceptance, rollback, packing); a
# single greedy row's whole step (`greedy_draft_verify`: its MTP catch-up and n_draft drafts, then `greedy_verify`,
# in one GraphStep, whatever n_draft). Every other op runs eagerly on the GPU, one launch each.
GRAPHED = {"forward", "mtp_forward", "checkpoint", "verify_forward", "verify_head", "rollback", "fused_other",
           "fused_row"}


def _callers() -> list[tuple[str, str]]:
    """(file, function) of every frame on the stack above the caller's."""
    f, out = sys._getframe(2), []
    while f is not None:
        out.append((f.f_code.co_filename, f.f_code.co_name))
        f = f.f_back
    return out


def _phase(names: tuple[str, ...]) -> str:
    """The innermost of `names` on the stack (the step phase an op belongs to)."""
    f = sys._getframe(2)
    while f is not None:
        if getattr(f.f_code, "co_qualname", "") == "EagerVerify.__call__":   # the unfused verify's head
            return "verify_head"
        if f.f_code.co_name in ("checkpoint", "rollback") and _under(f, "_draft"):   # the MTP cache's: eager
            return "draft_" + f.f_code.co_name
        if f.f_code.co_name in names:
            verifying = _under(f, "step_rows") or _under(f, "greedy_row_stream")   # (the engine's lone greedy row)
            names = {"hidden": "verify_forward" if verifying else "forward",
                     "_draft": "draft_other", "_mtp": "mtp_forward", "accept_batch": "accept",
                     "greedy_verify": "fused_other", "rollback_on_device": "rollback",
                     "greedy_draft_verify": "fused_row"}
            return names.get(f.f_code.co_name, f.f_code.co_name)
        f = f.f_back
    return "other"


def _under(frame, name: str) -> bool:
    while frame is not None:
        if frame.f_code.co_name == name:
            return True
        frame = frame.f_back
    return False


def _patch(to_host) -> None:
    for module in (engine_module, speculative):
        if to_host is not None and hasattr(module, "to_host" if module is speculative else "_to_host"):
            setattr(module, "to_host" if module is speculative else "_to_host", to_host)


def _counting_to_host(counts: Counter):
    """Wrap the one-wait transfer so each call counts as one sync."""
    real = host_module.to_host if host_module is not None else engine_module._to_host

    def wrapped(tensors):
        counts["sync:to_host"] += 1
        return real(tensors)
    return wrapped


real_engine_to_host = engine_module._to_host


def count_steps(engine: Engine, steps: int, breakdown: bool = False, ops_as_kernels: bool = False,
                graphed: bool = False) -> dict:
    """Per step: aten ops by phase, host syncs, and `eager_on_gpu`: the ops outside the phases a GPU run replays
    from CUDA graphs (GRAPHED), i.e. the kernels it launches one by one. With `breakdown`, the op names of each
    phase (per step). `graphed`: the engine is on the CUDA-graph path with no-op replays (graph_stub, its graphs
    captured already), so every op counted runs around the replays, all of them eager on a GPU; `replays` counts
    the graph replays."""
    totals, names, n = Counter(), Counter(), 0
    for _ in range(steps):
        if not engine.has_work:
            break
        host, ops = HostCounter(), OpCounter(ops_as_kernels)
        _patch(_counting_to_host(host.counts))
        replays = REPLAY_COUNT["count"]
        try:
            with host, ops:
                engine.step()
        finally:
            _patch(host_module.to_host if host_module is not None else real_engine_to_host)
        totals.update(host.counts)
        totals.update({"aten_ops": sum(ops.ops.values())})
        totals.update({f"aten_ops:{k}": v for k, v in ops.ops.items()})
        totals.update({"eager_on_gpu": sum(v for k, v in ops.ops.items() if graphed or k not in GRAPHED)})
        if graphed:
            totals.update({"replays": REPLAY_COUNT["count"] - replays})
        names.update(ops.names)
        n += 1
    syncs = sum(v for k, v in totals.items() if k.startswith("sync:"))
    out = {"steps": n, "per_step": {k: round(v / max(n, 1), 1) for k, v in sorted(totals.items())},
           "syncs_per_step": round(syncs / max(n, 1), 1)}
    if breakdown:
        phases = sorted({p for p, _ in names})
        out["breakdown"] = {("" if p in GRAPHED else "eager:") + p: dict(sorted(
            ((op, round(v / max(n, 1), 1)) for (q, op), v in names.items() if q == p), key=lambda kv: -kv[1]))
            for p in phases}
    return out


class WaitClock:
    """Within: the wall time the engine spends blocked on the device's results (every step's waits go through
    HostCopy.wait: a CUDA event's synchronize, then the lists), summed in `seconds`."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0

    def __enter__(self):
        self._real = real = host_module.HostCopy.wait

        def wait(copy):
            t = time.perf_counter()
            try:
                return real(copy)
            finally:
                self.seconds += time.perf_counter() - t
                self.calls += 1
        host_module.HostCopy.wait = wait
        return self

    def __exit__(self, *exc):
        host_module.HostCopy.wait = self._real


def time_steps(engine: Engine, steps: int) -> dict:
    """Wall time of `steps` engine steps (the device drained before and after) and the tokens they emitted; and
    the host's part: `host_ms_per_step`, the wall time of the steps' Python less their waits for the device
    (WaitClock; the last step's results are not waited for beyond the steps), `cpu_ms_per_step` the thread's CPU
    time (on a GPU it counts a spinning wait too)."""
    tokens0 = engine.counters["decode_tokens"]
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    n, clock = 0, WaitClock()
    with clock:
        start, cpu0 = time.perf_counter(), time.thread_time()
        while n < steps and engine.has_work:
            engine.step()
            n += 1
        launched, cpu = time.perf_counter(), time.thread_time() - cpu0
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = engine.counters["decode_tokens"] - tokens0
    per = lambda s: round(1e3 * s / max(n, 1), 3)  # noqa: E731
    return {"steps": n, "ms_per_step": per(seconds), "ms_per_token": round(1e3 * seconds / max(tokens, 1), 3),
            "tokens_per_step": round(tokens / max(n, 1), 3), "host_ms_per_step": per(launched - start - clock.seconds),
            "wait_ms_per_step": per(clock.seconds), "cpu_ms_per_step": per(cpu)}


def gpu_profile(engine: Engine, steps: int, top: int = 12) -> dict:
    """The device's side of `steps` engine steps (torch.profiler, CUPTI: the kernels replayed from CUDA graphs
    are traced one by one): per step the kernels' time summed, the time the device was busy (their intervals'
    union), how many ran, and the `top` kernels by time; and `runtime_api`, the host's time in CUDA runtime calls
    ([ms, calls] per step: a long cudaGraphLaunch is a host cost, a long synchronize a wait). Skipped (None) off
    a GPU."""
    if engine.device.type != "cuda":
        return None
    return profile_calls(lambda: engine.has_work and (engine.step() or True), steps, top)


def profile_calls(step, steps: int, top: int = 12) -> dict:
    """`gpu_profile` of `steps` calls of step() (it returns False when there is nothing left to do)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        n = 0
        while n < steps and step():
            n += 1
        torch.cuda.synchronize()
    from torch.autograd import DeviceType
    events = prof.events()
    spans = [(e.name, e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
    out = device_summary(spans, n, top)
    # the host's time in CUDA runtime calls (cudaGraphLaunch, cudaLaunchKernel, cudaEventSynchronize ...) per step
    runtime: dict[str, list] = {}
    for e in events:
        if e.device_type == DeviceType.CPU and e.name.startswith("cuda"):
            t = runtime.setdefault(e.name, [0.0, 0])
            t[0] += e.time_range.end - e.time_range.start
            t[1] += 1
    out["runtime_api"] = {name: [round(t / 1e3 / max(n, 1), 4), round(c / max(n, 1), 2)]
                          for name, (t, c) in sorted(runtime.items(), key=lambda kv: -kv[1][0])[:8]}
    return out


def device_summary(spans: list[tuple[str, float, float]], steps: int, top: int = 12) -> dict:
    """Per step, from device activity (name, start_us, end_us): the kernels' summed time, the busy time (the
    union of the intervals: kernels of one stream do not overlap, so the two agree there), the first-to-last
    span, the count, and the `top` names by summed time ([name, ms per step, count per step])."""
    n = max(steps, 1)
    total, busy, end, by_name = 0.0, 0.0, float("-inf"), {}
    for name, a, b in sorted(spans, key=lambda s: s[1]):
        total += b - a
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
        t, c = by_name.get(name, (0.0, 0))
        by_name[name] = (t + b - a, c + 1)
    span = (max(s[2] for s in spans) - min(s[1] for s in spans)) if spans else 0.0
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {"steps": steps, "kernel_ms_per_step": round(total / 1e3 / n, 4),
            "busy_ms_per_step": round(busy / 1e3 / n, 4), "span_ms_per_step": round(span / 1e3 / n, 4),
            "kernels_per_step": round(len(spans) / n, 1),
            "top": [[name[:90], round(t / 1e3 / n, 4), round(c / n, 2)] for name, (t, c) in ranked]}


def time_row_stream(model, prompt: list[int], n_draft: int, steps: int, profile_steps: int = 0) -> dict:
    """A lone greedy row's speculative steps outside the engine, on one SpeculativeDecoder with the single-row
    step's CUDA graph (on a GPU; eager elsewhere): `row_loop` times `steps` of them one at a time (step_rows, as
    the engine's batched path runs them: stage, replay, wait, bookkeeping), `row_stream` `steps` results of
    greedy_row_stream (each step launched before the previous one's results are read, as the engine runs a lone
    greedy row), each as `time_calls` reports them and with `profile_steps` more profiled on a GPU. Both after 5
    warm-up steps (the graph's eager calls and capture)."""
    from dsv4.generate import SamplingConfig
    from dsv4.generate.graphs import GraphDecoder
    device = model.embed.weight.device
    graphs = device.type == "cuda"
    budget = (n_draft + 1) * (2 * steps + 2 * profile_steps + 16)
    dec = speculative.SpeculativeDecoder(model, model.new_cache(1, len(prompt) + budget + 16), n_draft=n_draft)
    dec.fixed_shapes = dec.graph_drafts = graphs
    verifiers: dict = {}

    def verifier(n_tokens: int):   # (the batched path's, should a step take it: as the engine's)
        if n_tokens not in verifiers:
            verifiers[n_tokens] = GraphDecoder(model, dec.cache.select(slice(0, 1)), n_tokens=n_tokens,
                                               checkpoint=True)
        return verifiers[n_tokens]
    dec.prefill(0, prompt)
    greedy, emitted = SamplingConfig(temperature=0.0), [0]

    def one_step() -> tuple[int, bool]:
        res = dec.step_rows(slice(0, 1), [greedy], [None], [()], [budget - emitted[0]],
                            verifier if graphs else None)[0]
        emitted[0] += len(res.tokens)
        return len(res.tokens), not res.finished
    out = {}
    time_calls(one_step, 5, device)   # (warm-up: the graph's eager calls, its capture)
    out["row_loop"] = {"timed": time_calls(one_step, steps, device)}
    if profile_steps and graphs:
        out["row_loop"]["gpu"] = _guarded(profile_calls, lambda: one_step()[1], profile_steps)
    stream = dec.greedy_row_stream(0, budget - emitted[0], (), graphs, verifier if graphs else None)

    def stream_step() -> tuple[int, bool]:
        res = next(stream, None)
        if res is None:
            return 0, False
        emitted[0] += len(res.tokens)
        return len(res.tokens), not res.finished
    out["row_stream"] = {"timed": time_calls(stream_step, steps, device)}
    if profile_steps and graphs:
        out["row_stream"]["gpu"] = _guarded(profile_calls, lambda: stream_step()[1], profile_steps)
    stream.close()
    for label in out:
        out[label]["timed"]["graphs"] = {"captured": sum(v[1].graph is not None and not v[1].eager
                                                         for v in dec._row_steps.values() if hasattr(v[1], "graph"))}
    return out


def time_calls(step, steps: int, device: torch.device) -> dict:
    """`time_steps` of up to `steps` calls of step() -> (tokens emitted, whether to go on). (A pipelined stream
    has one more step in flight when its last result is read: the drain after the steps counts its device time
    too, 1 / steps too much.)"""
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, tokens, clock = 0, 0, WaitClock()
    with clock:
        start, cpu0 = time.perf_counter(), time.thread_time()
        while n < steps:
            n += 1
            emitted, more = step()
            tokens += emitted
            if not more:
                break
        launched, cpu = time.perf_counter(), time.thread_time() - cpu0
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    per = lambda s: round(1e3 * s / max(n, 1), 3)  # noqa: E731
    return {"steps": n, "ms_per_step": per(seconds), "ms_per_token": round(1e3 * seconds / max(tokens, 1), 3),
            "tokens_per_step": round(tokens / max(n, 1), 3), "host_ms_per_step": per(launched - start - clock.seconds),
            "wait_ms_per_step": per(clock.seconds), "cpu_ms_per_step": per(cpu)}


def host_profile(engine: Engine, steps: int, top: int = 25) -> str:
    """cProfile of `steps` engine steps: the functions with the most own time (the host's cost, by line)."""
    import cProfile
    import io
    import pstats
    prof, n = cProfile.Profile(), 0
    prof.enable()
    while n < steps and engine.has_work:
        engine.step()
        n += 1
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--n-draft", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--time-steps", type=int, default=0, help="also time this many steps (GPU)")
    ap.add_argument("--acceptance", type=float, default=0.76,
                    help="per-draft acceptance for the projected speed-up (a trained model's; random weights accept ~0)")
    ap.add_argument("--breakdown", action="store_true", help="the aten op names of each phase, per step")
    ap.add_argument("--ops-as-kernels", action="store_true",
                    help="count each dsv4.ops call as one op, not its CPU reference's aten ops (~ GPU kernels)")
    ap.add_argument("--profile-steps", type=int, default=20,
                    help="with --time-steps on a GPU: profile this many more steps (kernel and busy time, top kernels)")
    ap.add_argument("--cprofile", type=int, default=0, help="with --time-steps: cProfile this many more steps")
    ap.add_argument("--stub-graphs", action="store_true",
                    help="with --time-steps on a CPU: the CUDA-graph path with no-op replays (bench/graph_stub.py), "
                         "so the timed steps are the host's cost alone (no op counts)")
    ap.add_argument("--graph-path", action="store_true",
                    help="count on the CUDA-graph path (CPU: bench/graph_stub.py's no-op replays, after the graphs' "
                         "capture): the ops around the replays, all eager on a GPU, and the replays per step")
    ap.add_argument("--no-row", action="store_true",
                    help="also count (and time) the speculative step without the single greedy row's fused step "
                         "(`mtp_no_row`: the MTP catch-up and the fused verify, two graphs)")
    ap.add_argument("--unfused", action="store_true",
                    help="also count (and time) the speculative step without the fused greedy verify")
    ap.add_argument("--pipelined", action="store_true",
                    help="with --time-steps: also time a lone greedy row's speculative steps outside the engine, "
                         "one at a time (`mtp_row_loop`) and pipelined by greedy_row_stream (`mtp_row_stream`)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = dsv4.Transformer(dsv4.ModelConfig.preset(args.preset)).init_weights(seed=0).to_dtype(dtype)
    model = model.to(args.device).eval()
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt,)).tolist()
    out = {}
    spec = {"speculative": "mtp", "n_draft": args.n_draft}
    runs = [("plain", {}, "row"), ("mtp", spec, "row")]   # (fuse: row = every fusion, greedy = no single-row step)
    if args.no_row:
        runs.append(("mtp_no_row", spec, "greedy"))
    if args.unfused:
        runs.append(("mtp_unfused", spec, "none"))

    def started(kw: dict, fuse: str, steps: int, stub: bool) -> Engine:
        budget = (args.n_draft + 1) * (steps + 8) + 8
        if stub and "speculative" not in kw:
            kw = dict(kw, overlap=True)                # (as on a GPU)
        engine = Engine(model, max_batch=1, max_seq_len=args.prompt + budget + 16, prefill_chunk=args.prompt,
                        batch_invariant=not args.device.startswith("cuda"), **kw)   # (as `dsv4 serve`: auto)
        if stub:
            graph_path(engine)
        if engine.spec is not None and hasattr(engine.spec, "fuse_greedy"):
            engine.spec.fuse_greedy = fuse != "none"
        if engine.spec is not None and hasattr(engine.spec, "fuse_row"):
            engine.spec.fuse_row = fuse == "row"
        engine.submit(prompt, SamplingParams(max_tokens=budget, temperature=0, ignore_eos=True))
        engine.step()                                  # the prefill (and, plain, the first token)
        engine.step()                                  # one decode step not counted (first-step setup)
        return engine

    for label, kw, fuse in runs:
        if args.graph_path:   # (4 more steps first: every graph's 2 eager calls, then its capture)
            with stubbed_graphs():
                engine = started(kw, fuse, args.steps + 4, True)
                for _ in range(4):
                    engine.step()
                out[label] = count_steps(engine, args.steps, args.breakdown, args.ops_as_kernels, graphed=True)
        elif not args.stub_graphs:
            out[label] = count_steps(started(kw, fuse, args.steps, False), args.steps, args.breakdown,
                                     args.ops_as_kernels)
        if args.time_steps:   # an engine of its own: its graphs are captured outside the counting hooks
            extra = args.profile_steps + args.cprofile + 2 * REPLAYS   # (room for replay_times too)
            with stubbed_graphs() if args.stub_graphs else contextlib.nullcontext():
                engine = started(kw, fuse, args.time_steps + 5 + extra, args.stub_graphs)
                time_steps(engine, 5)                      # graphs captured (after their warm-up calls)
                out.setdefault(label, {})["timed"] = time_steps(engine, args.time_steps)
                out[label]["timed"]["graphs"] = _graph_report(engine)
                if args.profile_steps:   # (None off a GPU)
                    out[label]["gpu"] = _guarded(gpu_profile, engine, args.profile_steps)
                if args.cprofile:
                    out[label]["cprofile"] = host_profile(engine, args.cprofile).splitlines()
                if args.profile_steps:   # (last: it leaves the engine unusable)
                    out[label]["gpu_replays"] = _guarded(replay_times, engine, REPLAYS)
    if args.time_steps and args.pipelined:
        for name, timed in time_row_stream(model, prompt, args.n_draft, args.time_steps,
                                           args.profile_steps).items():
            out[f"mtp_{name}"] = timed
    if args.time_steps and "plain" in out:
        plain = out["plain"]["timed"]["ms_per_step"]
        for label in out:
            timed = out[label]["timed"]
            timed["step_cost_vs_plain"] = round(timed["ms_per_step"] / plain, 3)
            if label != "plain":   # tokens per step at this acceptance (each draft kept with that probability)
                tokens = sum(args.acceptance ** i for i in range(args.n_draft + 1))
                timed[f"projected_speedup_at_acceptance_{args.acceptance}"] = round(tokens * plain
                                                                                    / timed["ms_per_step"], 3)
    print(json.dumps(out, indent=1))


def replay_times(engine: Engine, replays: int = 20) -> dict | None:
    """The device time of each captured graph alone: `replays` back-to-back replays (no Python between them)
    between two CUDA events, in ms per replay, by graph; plus the graphs' time per step. This is what a step
    costs the device when the host keeps up. The replays run on stale inputs and leave the engine unusable (its
    device positions move and its host mirror does not): call it last. Skipped (None) off a GPU, or where a cache
    has no room for the replays."""
    if engine.device.type != "cuda":
        return None
    graphs = [("decode", f"decode{k}", g, g.cache, g.n_tokens) for k, g in engine._graphs.items()]
    per_step = {"decode": 1}
    if engine.spec is not None:
        graphs += [(k[0], f"mtp{k}", g, g.cache, g.n_tokens) for k, g in engine.spec._mtp_graphs.items()]
        graphs += [("fused", f"fused{k}", g, g.cache, g.n_tokens) for k, g in engine.spec._fused_graphs.items()]
        graphs += [("row", f"row{k}", g, g.cache, g.n_tokens) for k, g in _row_graphs(engine)]
        per_step = {"catch-up": 1, "draft": engine.spec.n_draft - 1, "fused": 1}
    out, kinds = {}, {}
    for kind, name, g, cache, n_tokens in graphs:
        graph = g.graph
        caches = getattr(cache, "caches", (cache,))   # (a CacheGroup: the single row's main and MTP caches)
        if graph is None or g.eager or any(max(c.lengths()) + replays * n_tokens > c.max_seq_len for c in caches):
            continue
        graph.replay()                                  # (warm)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        out[name] = round(start.elapsed_time(end) / replays, 4)
        kinds[kind] = max(kinds.get(kind, 0.0), out[name])
    # a step replays each kind once (the further drafts n_draft - 1 times; of several catch-up widths, one: the
    # slowest counted); a single greedy row's step replays its one graph alone
    step = kinds["row"] if "row" in kinds else sum(ms * per_step.get(kind, 1) for kind, ms in kinds.items())
    return {"ms_per_replay": out, "graphs_ms_per_step": round(step, 4)} if out else None


def _guarded(fn, *args):
    """fn(*args), or the error it raised as a string: a profiler that fails must not cost the run's timings."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        return f"failed: {type(e).__name__}: {e}"


def _row_graphs(engine: Engine) -> list:
    """(key, GraphStep) of the speculative decoder's single-row steps that are graphs (not eager calls)."""
    steps = getattr(engine.spec, "_row_steps", {})
    return [(k, v[1]) for k, v in steps.items() if hasattr(v[1], "graph")]


def _graph_report(engine: Engine) -> dict:
    """Which steps replayed CUDA graphs (captured, not fallen back to eager), by kind."""
    kinds = {"decode": list(engine._graphs.values()), "verify": list(engine._spec_graphs.values())}
    if engine.spec is not None:
        kinds["mtp"] = list(engine.spec._mtp_graphs.values())
        kinds["fused"] = list(getattr(engine.spec, "_fused_graphs", {}).values())
        kinds["row"] = [g for _, g in _row_graphs(engine)]
    return {k: {"captured": sum(g.graph is not None and not g.eager for g in v), "eager": sum(g.eager for g in v)}
            for k, v in kinds.items() if v}


if __name__ == "__main__":
    main()
