"""What the HTTP path of `dsv4 serve` costs on its own: the real server (dsv4.serve.api under uvicorn, the real
RequestHandle wake-ups) over a clock engine that emits one token per running row every `--step-ms`, driven by
bench/serve.py's load generator (the official openai client, streamed /v1/completions). The model costs
nothing, so every token/s short of the engine's ideal (rows / step time) is lost in the server or the client.

    python bench/serve_overhead.py [--step-ms 5] [--concurrency 64] [--max-tokens 256] [--requests 128]
                                   [--client-procs 1 4] [--gil-releases 200] [--tokens text|random]

The clock engine's step waits `--step-ms` without the GIL (the GPU working) in `--gil-releases` sleeps, each
taking the GIL back afterwards (as the real engine's syncs and torch calls do: each waits for the GIL while the
event loop holds it), then pushes one event per row from its thread. A step counts as late when it ends more
than half a step after its clock. `--tokens random` draws ids from a
32768 vocabulary over a ~300-token tokenizer, as the flash4 benchmark checkpoint does (most decode to nothing);
`text` cycles the ids of an English sentence (every token is text, so every token is streamed).

Reported per client-process count: output tok/s against the ideal, engine steps late (the engine thread could not
keep its clock), and CPU seconds per output token of the server's event loop (the server process less its engine
thread), the engine thread and the client processes. Results go to --json (default
bench/results/<date>_<device>_<commit>_serve_overhead.json).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import random
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import record, result_path  # noqa: E402  (bench/provenance.py)
from serve import PromptSource, free_port, make_client, run_level, run_level_procs  # noqa: E402


class ClockEngine:
    """An Engine stand-in with the real RequestHandle: every `step_s` each running row gets one token, a request
    ends with "length" at max_tokens, up to `max_batch` rows run and the rest wait in order."""

    def __init__(self, tokens: list[int], max_batch: int = 64, step_s: float = 0.005, gil_releases: int = 4,
                 max_seq_len: int = 8192):
        from dsv4.serve.engine import RequestHandle
        self._handle_cls, self.tokens = RequestHandle, tokens
        self.max_batch, self.step_s, self.gil_releases, self.max_seq_len = max_batch, step_s, gil_releases, max_seq_len
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._queue: collections.deque = collections.deque()
        self._rows: list[list] = []   # [handle, params, tokens emitted]
        self._stop = threading.Event()
        self.steps = self.late_steps = self.emitted = 0
        self.thread_cpu = 0.0
        self._thread = threading.Thread(target=self._loop, daemon=True, name="clock-engine")

    def start(self) -> "ClockEngine":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def submit(self, prompt, params):
        handle = self._handle_cls(f"req-{next(self._ids)}", len(prompt), self)
        with self._lock:
            self._queue.append([handle, params, 0])
        return handle

    def _wake(self) -> None:
        """RequestHandle.cancel calls it; the clock reaps cancelled rows at its next step anyway."""

    def stats(self) -> dict:
        return {"queue_len": len(self._queue), "running": len(self._rows), "prefill_tokens": 0,
                "decode_tokens": self.emitted, "prefix_lookup_tokens": 0, "prefix_hit_tokens": 0,
                "spec_drafted": 0, "spec_accepted": 0, "steps": self.steps, "late_steps": self.late_steps,
                "engine_thread_cpu_s": self.thread_cpu}

    def _loop(self) -> None:
        from dsv4.serve.types import TokenEvent
        next_t = time.perf_counter()
        while not self._stop.is_set():
            next_t += self.step_s
            for i in range(self.gil_releases):   # the GPU working: waits without the GIL, each taking it back
                wait = (next_t - time.perf_counter()) / (self.gil_releases - i)
                time.sleep(max(wait, 0.0))
            if time.perf_counter() > next_t + self.step_s / 2 and self._rows:
                self.late_steps += 1
                next_t = time.perf_counter()
            with self._lock:
                while self._queue and len(self._rows) < self.max_batch:
                    self._rows.append(self._queue.popleft())
            keep = []
            for row in self._rows:
                handle, params, n = row
                if handle.cancelled:
                    handle._push(TokenEvent(None, finish_reason="abort"))
                    continue
                n += 1
                last = n >= params.max_tokens
                handle._push(TokenEvent(self.tokens[n % len(self.tokens)], finish_reason="length" if last else None))
                self.emitted += 1
                if not last:
                    row[2] = n
                    keep.append(row)
            self.steps += 1 if self._rows else 0
            self._rows = keep
            self.thread_cpu = time.thread_time()


def _serve(port: int, step_s: float, gil_releases: int, max_batch: int, token_mode: str, switch_s: float | None,
           ready) -> None:
    """The server process: tokenizer, clock engine, the real app under uvicorn, plus /_overhead (engine and
    process CPU counters, read before and after a level)."""
    import uvicorn

    from dsv4.serve.api import build_app
    from dsv4.train.tokenizer import train_bpe
    tok = train_bpe(["Hello there, how are you?\n", "Paris is the capital of France.\n"] * 20, 300,
                    tempfile.mkdtemp(prefix="serve_overhead_tok_"))
    if token_mode == "text":
        tokens = tok.encode("Hello there, how are you? Paris is the capital of France.\n")
    else:
        rng = random.Random(0)
        tokens = [rng.randrange(32768) for _ in range(4096)]
    if switch_s is not None:
        sys.setswitchinterval(switch_s)
    engine = ClockEngine(tokens, max_batch=max_batch, step_s=step_s, gil_releases=gil_releases).start()
    app = build_app(engine, tok, "clock")

    @app.get("/_overhead")
    async def overhead():
        t = os.times()
        return {**engine.stats(), "process_cpu_s": t.user + t.system, "time": time.perf_counter()}

    profiler = {}

    @app.get("/_profile/{action}")
    async def profile(action: str):
        """start: profile the event loop's thread (cProfile); stop: write its stats to $SERVE_OVERHEAD_PROFILE."""
        import cProfile
        if action == "start":
            profiler["p"] = cProfile.Profile()
            profiler["p"].enable()
        elif "p" in profiler:
            prof = profiler.pop("p")
            prof.disable()
            prof.dump_stats(os.environ.get("SERVE_OVERHEAD_PROFILE", "/tmp/serve_overhead.prof"))
        return {"ok": True}

    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    ready.set()
    server.run()


def _get(url: str) -> dict:
    import httpx
    return httpx.get(url, timeout=10).json()


def measure(url: str, args, procs: int) -> dict:
    source = PromptSource(32768)
    common = dict(concurrency=args.concurrency, prompt_len=args.prompt_len, max_tokens=args.max_tokens,
                  n_requests=args.requests, duration_limit=args.duration_limit, source=source, seed=args.seed)
    if args.profile:
        _get(url + "/_profile/start")
    before = _get(url + "/_overhead")
    if procs > 1:
        lvl = run_level_procs(url, "clock", procs=procs, **common)
    else:
        async def one():
            client = make_client(url, 600, args.concurrency)
            try:
                return await run_level(client, "clock", **common)
            finally:
                await client.close()
        lvl = asyncio.run(one())
    after = _get(url + "/_overhead")
    if args.profile:
        _get(url + "/_profile/stop")
    d = {k: after[k] - before[k] for k in ("steps", "late_steps", "engine_thread_cpu_s", "process_cpu_s", "time")}
    tokens = lvl["output_tokens"] or 1
    chunks = lvl.get("chunks") or None
    ideal = args.concurrency / (args.step_ms / 1e3)
    loop_cpu = d["process_cpu_s"] - d["engine_thread_cpu_s"]
    return {"client_procs": procs, "output_tok_per_s": lvl["output_tok_per_s"], "ideal_tok_per_s": round(ideal),
            "fraction_of_ideal": round(lvl["output_tok_per_s"] / ideal, 3) if lvl["output_tok_per_s"] else None,
            "wall_s": lvl["wall_s"], "errors": lvl["errors"], "itl_p50_ms": lvl["itl_p50_ms"],
            "itl_p99_ms": lvl["itl_p99_ms"], "tpot_p50_ms": lvl["tpot_p50_ms"], "ttft_p50_ms": lvl["ttft_p50_ms"],
            "engine_steps": d["steps"], "engine_late_steps": d["late_steps"],
            "server_loop_cpu_us_per_token": round(loop_cpu / tokens * 1e6, 2),
            "engine_thread_cpu_us_per_token": round(d["engine_thread_cpu_s"] / tokens * 1e6, 2),
            "client_cpu_us_per_token": round(lvl["client_cpu_s"] / tokens * 1e6, 2),
            "server_loop_cpu_us_per_chunk": round(loop_cpu / (chunks or 1) * 1e6, 2),
            "client_cpu_us_per_chunk": round(lvl["client_cpu_s"] / (chunks or 1) * 1e6, 2),
            "server_cpu_util": round(d["process_cpu_s"] / d["time"], 3),
            "client_cpu_util": round(lvl["client_cpu_s"] / lvl["wall_s"], 3), "chunks": chunks, "level": lvl}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step-ms", type=float, default=5.0, help="the clock engine's step time")
    p.add_argument("--gil-releases", type=int, default=4, help="the step's wait is this many sleeps, each giving "
                   "the GIL up and taking it back (as the real engine's syncs and torch calls do)")
    p.add_argument("--tokens", choices=["text", "random"], default="random",
                   help="random: flash4-like ids (mostly no text); text: every token streams text")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--client-procs", type=int, nargs="+", default=[1, 4])
    p.add_argument("--duration-limit", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--switch-interval", type=float, default=0.0005, help="sys.setswitchinterval in the server "
                   "(default: `dsv4 serve`'s; Python's own is 0.005)")
    p.add_argument("--profile", action="store_true", help="cProfile the server's event loop during each run (stats "
                   "to $SERVE_OVERHEAD_PROFILE, default /tmp/serve_overhead.prof)")
    p.add_argument("--json", help="result file (default: bench/results/<date>_<device>_<commit>_serve_overhead.json)")
    args = p.parse_args(argv)

    import multiprocessing as mp
    import httpx
    ctx = mp.get_context("spawn")
    port = free_port()
    ready = ctx.Event()
    server = ctx.Process(target=_serve, args=(port, args.step_ms / 1e3, args.gil_releases, args.concurrency,
                                               args.tokens, args.switch_interval, ready), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port}"
    result = {**record(), "bench": "serve_overhead", "args": vars(args), "cpus": os.cpu_count(), "runs": []}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not server.is_alive():
                raise RuntimeError("the overhead server did not start")
            time.sleep(0.2)
        for procs in args.client_procs:
            run = measure(url, args, procs)
            print(json.dumps({k: v for k, v in run.items() if k != "level"}), flush=True)
            result["runs"].append(run)
    finally:
        server.kill()
        server.join(timeout=5)
    path = args.json or result_path("serve_overhead")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
