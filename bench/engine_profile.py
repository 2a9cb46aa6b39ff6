"""Where a serving engine's time goes, in one process (no HTTP): the 4-layer V4-Flash-geometry model on the GPU,
`--batch` prompts of `--prompt-len` tokens, then greedy decode; every step timed alone (CUDA-synchronised) and
classed by what it did (prefill tokens, decode tokens), with and without batch-invariant mode and the prefix
cache. A warm-up round with the same shapes runs first (kernel compilation, CUDA-graph capture), so the timed
round is the steady state. Each batch size also times the model alone (the same prompts prefilled into a cache of
the engine's size, then CUDA-graphed decode steps, as bench/e2e.py does): the engine's decode step over the
model's is the engine's own cost. `--trace` adds a torch.profiler table of one decode step's kernels,
`--cprofile` the Python functions that took the host's time over the timed round. `--serve-loop` runs the
engine on its background thread, as `dsv4 serve` does, with the requests read by an asyncio loop in the main
thread: inter-token gaps as that loop sees them and how late its timers fire (the GIL shared with the engine
thread), for each `--switch-interval` (Python's GIL hand-over interval; the default is 5 ms). `--overlap` times
the engine's decode steps with overlap off and on (no per-step synchronisation, which would undo the overlap: the
steps after the last prompt's prefill, timed together), with the step trace's host, wait and hand-out parts.

    python bench/engine_profile.py [--prompt-len 1024] [--max-tokens 64] [--batch 1 64] [--trace] [--cprofile]
                                   [--overlap] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import build_model  # noqa: E402

from dsv4.serve.engine import Engine  # noqa: E402
from dsv4.serve.prefix_cache import PrefixCache  # noqa: E402
from dsv4.serve.types import SamplingParams  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_round(eng: Engine, prompts: list[list[int]], params: SamplingParams) -> dict:
    hs = [eng.submit(p, params) for p in prompts]
    prefill_ms, decode_ms, mixed_ms = [], [], []
    t_all = time.perf_counter()
    while eng.has_work:
        before = dict(eng.counters)
        sync()
        t = time.perf_counter()
        eng.step()
        sync()
        ms = 1e3 * (time.perf_counter() - t)
        pre = eng.counters["prefill_tokens"] - before["prefill_tokens"]
        dec = eng.counters["decode_tokens"] - before["decode_tokens"]
        (prefill_ms if pre and not dec else decode_ms if dec and not pre else mixed_ms).append(ms)
    wall = time.perf_counter() - t_all
    tokens = sum(1 for h in hs for e in h if e.token is not None)
    med = lambda xs: round(statistics.median(xs), 3) if xs else None  # noqa: E731
    return dict(wall_s=round(wall, 3), tokens=tokens, prefill_steps=len(prefill_ms),
                prefill_ms_total=round(sum(prefill_ms), 1), decode_steps=len(decode_ms),
                decode_step_ms_p50=med(decode_ms), mixed_steps=len(mixed_ms), mixed_ms_total=round(sum(mixed_ms), 1),
                decode_tok_per_s=round(len(prompts) * 1e3 / med(decode_ms), 1) if decode_ms else None)


def model_alone(model, prompts: list[list[int]], max_seq_len: int, steps: int) -> float:
    """ms per decode step of the bare model: the prompts prefilled into one cache, then graphed decode steps."""
    from dsv4.generate.graphs import GraphDecoder
    cache = model.new_cache(len(prompts), max_seq_len)
    with torch.no_grad():
        last = torch.cat([model(torch.tensor([p], device=model.embed.weight.device), cache=cache.select(i),
                                last_only=True)[:, -1].argmax(-1) for i, p in enumerate(prompts)])
    if cache.positions.is_cuda:
        dec = GraphDecoder(model, cache)
    else:
        def dec(t: torch.Tensor) -> torch.Tensor:
            return model(t.view(-1, 1), cache=cache)[:, -1]
    tokens = last
    with torch.no_grad():
        for _ in range(3):  # eager warm-up, capture
            tokens = dec(tokens).argmax(-1)
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            tokens = dec(tokens).argmax(-1)
    sync()
    return 1e3 * (time.perf_counter() - t) / steps


def run(model, *, batch: int, prompt_len: int, max_tokens: int, invariant: bool, prefix: bool, trace: bool,
        cprofile: bool = False) -> dict:
    pc = PrefixCache(model, 4 << 30, 0, block=256, verify_model=False) if prefix else None  # as dsv4 serve
    eng = Engine(model, max_batch=batch, max_seq_len=prompt_len + max_tokens + 8, prefix_cache=pc,
                 batch_invariant=invariant)
    g = torch.Generator().manual_seed(batch)
    vocab = model.config.vocab_size
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    warm = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    timed_round(eng, warm, params)   # compiles and captures what the timed round uses
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    prof = None
    if cprofile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    out = dict(batch=batch, prompt_len=prompt_len, max_tokens=max_tokens, invariant=invariant, prefix=prefix,
               graphs=sorted(eng._graphs), **timed_round(eng, prompts, params))
    if prof is not None:
        import io
        import pstats
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(20)
        out["cprofile"] = text.getvalue()
    if trace:
        from torch.profiler import ProfilerActivity, profile
        for p in prompts:
            eng.submit(p, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        while eng._admitted:   # prefill, then profile one decode step
            eng.step()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            eng.step()
            sync()
        eng.run_until_idle()
        out["trace"] = prof.key_averages().table(sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total", row_limit=15)
    return out


def decode_rate(model, *, batch: int, prompt_len: int, max_tokens: int, overlap: bool) -> dict:
    """ms per engine decode step at `batch` rows with `overlap` off or on: the steps after every prompt has been
    prefilled, timed together (one sync at each end), after a warm-up round of the same shapes; plus the step
    trace's medians of those steps."""
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from engine_trace import load, summarise
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.jsonl")
        eng = Engine(model, max_batch=batch, max_seq_len=prompt_len + max_tokens + 8, batch_invariant=not cuda,
                     overlap=overlap, trace=path)
        g = torch.Generator().manual_seed(batch)
        vocab = model.config.vocab_size
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        for _ in range(2):   # the first round compiles and captures
            hs = [eng.submit(torch.randint(0, vocab, (prompt_len,), generator=g).tolist(), params)
                  for _ in range(batch)]
            while eng._queue or eng._admitted:
                eng.step()
            sync()
            first = eng.counters["steps"]
            t = time.perf_counter()
            eng.run_until_idle()
            sync()
            wall = time.perf_counter() - t
            steps = eng.counters["steps"] - first
        tokens = sum(1 for h in hs for e in h if e.token is not None)
        eng.stop()
        _, trace = load(path)
    timed = summarise(trace[first:], batch)   # (the trace's step i is engine step i + 1)
    dec = timed.get("decode", {})
    return dict(batch=batch, prompt_len=prompt_len, overlap=overlap, decode_steps=steps,
                engine_decode_step_ms=round(1e3 * wall / steps, 3), tok_per_s=round(tokens / wall, 1),
                **{k: dec.get(k) for k in ("host_before_launch_ms_p50", "wait_ms_p50", "deliver_ms_p50",
                                           "other_host_ms_p50")})


def serve_loop(model, *, batch: int, prompt_len: int, max_tokens: int, switch_interval: float) -> dict:
    """Inter-token gaps and event-loop timer lateness with the engine on its own thread (see the module doc)."""
    import asyncio
    old = sys.getswitchinterval()
    sys.setswitchinterval(switch_interval)
    eng = Engine(model, max_batch=batch, max_seq_len=prompt_len + max_tokens + 8).start()
    g = torch.Generator().manual_seed(batch)
    vocab = model.config.vocab_size
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def one(prompt: list[int], gaps: list[float]) -> None:
        last = None
        async for _ in eng.submit(prompt, params):
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now

    async def round_() -> dict:
        gaps: list[float] = []
        lag: list[float] = []
        stop = False

        async def ticker() -> None:
            while not stop:
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                lag.append(time.perf_counter() - t - 0.001)
        tick = asyncio.create_task(ticker())
        t0 = time.perf_counter()
        await asyncio.gather(*(one(torch.randint(0, vocab, (prompt_len,), generator=g).tolist(), gaps)
                               for _ in range(batch)))
        wall = time.perf_counter() - t0
        stop = True
        await tick
        q = lambda xs, f: round(1e3 * sorted(xs)[min(len(xs) - 1, int(f * len(xs)))], 3) if xs else None  # noqa: E731
        return dict(itl_p50_ms=q(gaps, 0.5), itl_p99_ms=q(gaps, 0.99), loop_lag_p50_ms=q(lag, 0.5),
                    loop_lag_p99_ms=q(lag, 0.99), tok_per_s=round(batch * max_tokens / wall, 1))

    try:
        asyncio.run(round_())   # warm-up: compilation, graph capture
        return dict(batch=batch, prompt_len=prompt_len, switch_interval_ms=1e3 * switch_interval,
                    **asyncio.run(round_()))
    finally:
        eng.stop()
        sys.setswitchinterval(old)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--trace", action="store_true")
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--serve-loop", action="store_true", help="only the engine thread + asyncio measurement")
    p.add_argument("--overlap", action="store_true", help="only the decode rate with overlap off and on (and the "
                   "model alone)")
    p.add_argument("--switch-interval", type=float, nargs="+", default=[0.005, 0.0002])
    p.add_argument("--tiny-cpu", action="store_true", help="smoke: the tiny preset on the CPU")
    p.add_argument("--json")
    a = p.parse_args()
    if a.tiny_cpu:
        import dsv4
        model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=0).eval()
    else:
        model = build_model()
    results = []
    if a.serve_loop:
        for batch in a.batch:
            for si in a.switch_interval:
                r = serve_loop(model, batch=batch, prompt_len=a.prompt_len, max_tokens=a.max_tokens, switch_interval=si)
                print(json.dumps(r), flush=True)
                results.append(r)
        a.batch = []
    for batch in a.batch if a.overlap else []:
        g = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(0, model.config.vocab_size, (a.prompt_len,), generator=g).tolist()
                   for _ in range(batch)]
        rows = [dict(batch=batch, prompt_len=a.prompt_len, model_alone_decode_step_ms=round(
            model_alone(model, prompts, a.prompt_len + a.max_tokens + 8, a.max_tokens), 3))]
        rows += [decode_rate(model, batch=batch, prompt_len=a.prompt_len, max_tokens=a.max_tokens, overlap=o)
                 for o in (False, True)]
        for r in rows:
            print(json.dumps(r), flush=True)
        results += rows
    if a.overlap:
        a.batch = []
    for batch in a.batch:
        g = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(0, model.config.vocab_size, (a.prompt_len,), generator=g).tolist()
                   for _ in range(batch)]
        alone = dict(batch=batch, prompt_len=a.prompt_len, model_alone_decode_step_ms=round(
            model_alone(model, prompts, a.prompt_len + a.max_tokens + 8, a.max_tokens), 3))
        print(json.dumps(alone), flush=True)
        results.append(alone)
        for invariant in (False, True):
            for prefix in (False, True):
                r = run(model, batch=batch, prompt_len=a.prompt_len, max_tokens=a.max_tokens, invariant=invariant,
                        prefix=prefix, trace=a.trace and not prefix, cprofile=a.cprofile and not prefix)
                trace, host = r.pop("trace", None), r.pop("cprofile", None)
                print(json.dumps(r), flush=True)
                for text in (trace, host):
                    if text:
                        print(text, flush=True)
                results.append(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
