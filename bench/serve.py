"""Load generator for an OpenAI-compatible server (`dsv4 serve`, or a peer such as `transformers serve`), driven
by the official `openai` client (AsyncOpenAI, streamed completions with stream_options.include_usage).

    python bench/serve.py --url http://127.0.0.1:8000 [--vocab-size 32768]
    python bench/serve.py --launch "dsv4 serve --checkpoint ckpt" [--peer-launch "transformers serve ..."]
                          [--concurrency 1 8 32 64] [--prompt-len 1024 32768] [--max-tokens 256]
                          [--requests-per-level N] [--duration-limit S] [--prefix-len 32768] [--mtp-compare]
                          [--client-procs 4]
    python bench/serve.py --tiny-cpu          # smoke: a random tiny model served on the CPU, small lengths
    python bench/serve.py --make-checkpoint /tmp/flash4 [--preset flash4|tiny] [--mtp-layers 1] [--official]

Measured per (server, prompt length, concurrency): TTFT p50/p99 (from the moment the client hands the encoded request
to its HTTP transport to the first streamed chunk with a choice: the client's own building and JSON encoding of the
request, ~5 ms for 32K ids on a slow host, is not the server's and is reported apart as client_prep), TPOT p50/p99 (per request: time from the first
to the last streamed token over the tokens after the first), ITL p50/p99 (gaps between streamed chunks),
aggregate output tokens/s (completion tokens of all requests / wall time of the level), requests, errors.
Prompts are random token ids from the model's vocabulary sent as `prompt=[ids]` to /v1/completions (through
extra_body: the client's own handling of a typed id list costs ~1 ms per 30 ids before the request leaves, which
would count in the TTFT), so their lengths are exact; outputs have exactly `--max-tokens` tokens because `ignore_eos` is sent in extra_body
(`dsv4 serve` honours it, as vLLM and SGLang do; a server that ignores it may stop early, which the
completion-token counts then show).

Second turn over a shared prefix: a request over prefix P primes the prefix cache, then the TTFT of a request
P + other suffix (a hit) is compared with one over a fresh prefix of the same length (a miss).
--mtp-compare: the single-stream run against the launched server as given and with `--speculative mtp`
appended; tokens/s of both and the acceptance rate read from /metrics.

Every loop is bounded in count (--requests-per-level) and time (--duration-limit, --request-timeout).
Results go to bench/results/<date>_<device>_<commit>_serve.json (see bench/provenance.py) unless --json names
another file; a table is printed.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import record, result_path  # noqa: E402  (bench/provenance.py)


# ----------------------------------------------------------------------------------------------- statistics

def percentile(xs: list[float], p: float) -> float | None:
    """The p-th percentile (0..100) with linear interpolation between order statistics; None for no data."""
    if not xs:
        return None
    if not 0 <= p <= 100:
        raise ValueError(f"percentile p={p}: must be in [0, 100]")
    s = sorted(xs)
    pos = (len(s) - 1) * p / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class RequestResult:
    """One streamed request: when it started, when it was sent (the encoded request handed to the HTTP transport;
    None with a client not made by `make_client`), when each chunk with a choice arrived, what usage said."""
    start: float
    sent: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    got_usage: bool = False
    cached_tokens: int | None = None      # usage.prompt_tokens_details.cached_tokens, where the server reports it
    error: str | None = None
    text: str = ""                        # the streamed completion text (what --mtp-compare checks plain vs MTP on)

    @property
    def ttft(self) -> float | None:
        """Seconds from sending the request (or from the call, when the send went unseen) to its first token."""
        return self.chunk_times[0] - (self.start if self.sent is None else self.sent) if self.chunk_times else None

    @property
    def client_prep(self) -> float | None:
        """Seconds the client took to build and encode the request before sending it."""
        return None if self.sent is None else self.sent - self.start

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first (None below two tokens)."""
        if len(self.chunk_times) < 2 or self.completion_tokens < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.completion_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


def summarize(results: list[RequestResult], wall_s: float, max_tokens: int | None = None) -> dict:
    """Latency percentiles (ms) and throughput of one level; failed requests count only as errors.
    `short_outputs` counts requests that ended before `max_tokens` (a server ignoring ignore_eos), `no_usage`
    those whose stream carried no usage chunk (their tokens are counted as one per chunk)."""
    ok = [r for r in results if r.error is None]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    prep = [r.client_prep for r in ok if r.client_prep is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    itl = [x for r in ok for x in r.itls]
    out_tokens = sum(r.completion_tokens for r in ok)
    ms = lambda v: None if v is None else round(v * 1e3, 3)  # noqa: E731
    errors: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {"requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
            "error_messages": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
            "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
            "client_prep_p50_ms": ms(percentile(prep, 50)),
            "tpot_p50_ms": ms(percentile(tpot, 50)), "tpot_p99_ms": ms(percentile(tpot, 99)),
            "itl_p50_ms": ms(percentile(itl, 50)), "itl_p99_ms": ms(percentile(itl, 99)),
            "short_outputs": sum(1 for r in ok if max_tokens and r.completion_tokens < max_tokens),
            "no_usage": sum(1 for r in ok if not r.got_usage),
            "output_tokens": out_tokens, "chunks": sum(len(r.chunk_times) for r in ok), "wall_s": round(wall_s, 3),
            "output_tok_per_s": round(out_tokens / wall_s, 2) if wall_s > 0 else None,
            "mean_completion_tokens": round(out_tokens / len(ok), 2) if ok else None,
            "mean_prompt_tokens": round(sum(r.prompt_tokens for r in ok) / len(ok), 1) if ok else None}


# ----------------------------------------------------------------------------------------------- requests

def _error_text(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg[:200]}"


_SENDING: contextvars.ContextVar[RequestResult | None] = contextvars.ContextVar("sending", default=None)


async def _mark_sent(request) -> None:
    """httpx's request hook: runs in the sending task once the request is built and encoded, just before the
    transport sends it, so it stamps that task's RequestResult."""
    res = _SENDING.get()
    if res is not None and res.sent is None:
        res.sent = time.perf_counter()


async def stream_one(client, model: str, prompt: list[int] | str, max_tokens: int,
                     ignore_eos: bool = True) -> RequestResult:
    """One streamed greedy completion; any failure becomes the result's error, never an exception."""
    res = RequestResult(start=time.perf_counter())
    sending = _SENDING.set(res)
    extra: dict = {"ignore_eos": True} if ignore_eos else {}
    if not isinstance(prompt, str):
        # token ids travel in extra_body, which the client sends as given: its typed `prompt` argument is walked
        # element by element against every member of its Union (about a second for 32K ids on a slow host), and
        # that time, spent before the request leaves, would count as the server's TTFT
        extra["prompt"], prompt = prompt, ""
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=extra)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                res.chunk_times.append(now)
                res.text += chunk.choices[0].text or ""
            if getattr(chunk, "usage", None):
                res.got_usage = True
                res.completion_tokens = chunk.usage.completion_tokens or 0
                res.prompt_tokens = chunk.usage.prompt_tokens or 0
                details = getattr(chunk.usage, "prompt_tokens_details", None)
                res.cached_tokens = getattr(details, "cached_tokens", None)
        if not res.chunk_times:
            res.error = "no tokens streamed"
        elif not res.got_usage:
            res.completion_tokens = len(res.chunk_times)   # no usage chunk: one token per chunk
    except Exception as e:  # noqa: BLE001 - a benchmark records what failed and goes on
        res.error = _error_text(e)
    finally:
        _SENDING.reset(sending)
    return res


def random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


_WORDS = ("time year people way day man thing woman life child world school state family student group country "
          "problem hand part place case week company system program question work number night point home water "
          "room mother area money story fact month lot right study book eye job word business issue side kind head "
          "house service friend father power hour game line end member law car city name president team minute").split()


class PromptSource:
    """Random prompts of a set length: token ids (exact lengths), or text for a server whose completions take no
    ids (then the lengths are what the server's tokenizer makes of it: `mean_prompt_tokens` reports them).
    Text comes from `tokenizer` (a `tokenizers.Tokenizer`) decoding random ids of its own vocabulary, or from
    random common words (about one token each in a large BPE vocabulary). With `text_ids` (a tokenized text),
    prompts are windows of that text at random offsets: what a trained model's MTP drafts need to agree with it."""

    def __init__(self, vocab: int, as_text: bool = False, tokenizer=None, text_ids: list[int] | None = None):
        self.vocab, self.as_text, self.tokenizer, self.text_ids = vocab, as_text, tokenizer, text_ids

    def make(self, rng: random.Random, n: int) -> list[int] | str:
        if self.text_ids is not None:
            if len(self.text_ids) < n:
                raise ValueError(f"--prompt-text has {len(self.text_ids)} tokens, fewer than a {n}-token prompt")
            start = rng.randrange(len(self.text_ids) - n + 1)
            ids = self.text_ids[start:start + n]
            return self.tokenizer.decode(ids, skip_special_tokens=False) if self.as_text else ids
        if not self.as_text:
            return random_prompt(rng, n, self.vocab)
        if self.tokenizer is not None:
            return self.tokenizer.decode(random_prompt(rng, n, min(self.vocab, self.tokenizer.get_vocab_size())),
                                         skip_special_tokens=True)
        return "".join(" " + rng.choice(_WORDS) for _ in range(n))


async def run_level(client, model: str, *, concurrency: int, prompt_len: int, max_tokens: int, n_requests: int,
                    duration_limit: float, source: PromptSource, seed: int, ignore_eos: bool = True,
                    keep_texts: bool = False) -> dict:
    """`n_requests` requests kept `concurrency` in flight; no new request starts after `duration_limit` s. With
    `keep_texts`, the result has each request's completion text (in finishing order)."""
    rng = random.Random(seed)
    prompts = [source.make(rng, prompt_len) for _ in range(n_requests)]
    results: list[RequestResult] = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    deadline = t0 + duration_limit
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(prompts) and time.perf_counter() < deadline:
            p = prompts[next_index]
            next_index += 1
            results.append(await stream_one(client, model, p, max_tokens, ignore_eos))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, n_requests))))
    wall = time.perf_counter() - t0
    out = {"concurrency": concurrency, "prompt_len": prompt_len, "max_tokens": max_tokens,
           "planned_requests": n_requests, "client_procs": 1,
           "client_cpu_s": round(time.process_time() - cpu0, 3), **summarize(results, wall, max_tokens)}
    if keep_texts:   # (in request order: `prompts` are taken in order, and one worker keeps it at concurrency 1)
        out["texts"] = [r.text for r in results]
    return out


async def _client_share(url: str, model: str, timeout: float, concurrency: int, prompts: list, max_tokens: int,
                        ignore_eos: bool, deadline: float) -> list[RequestResult]:
    """One client process's part of a level: its prompts, `concurrency` in flight, on its own event loop."""
    client = make_client(url, timeout, concurrency)
    results: list[RequestResult] = []
    queue = list(reversed(prompts))

    async def worker() -> None:
        while queue and time.perf_counter() < deadline:
            results.append(await stream_one(client, model, queue.pop(), max_tokens, ignore_eos))
    try:
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
    finally:
        await client.close()
    return results


def _client_proc(conn, go, url: str, model: str, timeout: float, concurrency: int, prompts: list, max_tokens: int,
                 ignore_eos: bool, duration_limit: float) -> None:
    """A spawned client process: imports done, it says ready, waits for `go`, runs its share, sends results
    (perf_counter is CLOCK_MONOTONIC, one clock for every process of the host) and its CPU seconds."""
    import openai  # noqa: F401  (imported before the start, so it does not count in the level's time)
    conn.send("ready")
    go.wait()
    cpu0 = time.process_time()
    results = asyncio.run(_client_share(url, model, timeout, concurrency, prompts, max_tokens, ignore_eos,
                                        time.perf_counter() + duration_limit))
    conn.send((results, time.process_time() - cpu0, time.perf_counter()))
    conn.close()


def run_level_procs(url: str, model: str, *, procs: int, concurrency: int, prompt_len: int, max_tokens: int,
                    n_requests: int, duration_limit: float, source: PromptSource, seed: int, ignore_eos: bool = True,
                    timeout: float = 600.0) -> dict:
    """run_level with the load split over `procs` client processes (spawned), each with its own event loop and
    openai client: one Python process parsing every SSE chunk of 64 streams can be slower than the server.
    Process i keeps its share of `concurrency` in flight over prompts i, i + procs, ...; the level's wall time
    runs from the common start to the last request's end."""
    import multiprocessing as mp
    rng = random.Random(seed)
    prompts = [source.make(rng, prompt_len) for _ in range(n_requests)]
    procs = max(1, min(procs, concurrency, n_requests))
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    workers = []
    for i in range(procs):
        share = concurrency // procs + (1 if i < concurrency % procs else 0)
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_client_proc, daemon=True,
                        args=(child, go, url, model, timeout, share, prompts[i::procs], max_tokens, ignore_eos,
                              duration_limit))
        p.start()
        child.close()
        workers.append((p, parent))
    results: list[RequestResult] = []
    cpu, end = 0.0, 0.0
    try:
        for p, conn in workers:
            if conn.recv() != "ready":
                raise RuntimeError("a client process did not start")
        t0 = time.perf_counter()
        go.set()
        for p, conn in workers:
            got, secs, t_end = conn.recv()
            results += got
            cpu, end = cpu + secs, max(end, t_end)
    finally:
        for p, _ in workers:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    wall = end - t0
    return {"concurrency": concurrency, "prompt_len": prompt_len, "max_tokens": max_tokens,
            "planned_requests": n_requests, "client_procs": procs, "client_cpu_s": round(cpu, 3),
            **summarize(results, wall, max_tokens)}


async def prefix_test(client, model: str, *, prefix_len: int, suffix_len: int, trials: int, source: PromptSource,
                      seed: int, max_tokens: int = 1, ignore_eos: bool = True,
                      duration_limit: float = float("inf")) -> dict:
    """TTFT of a second request sharing a primed prefix (hit) vs one over a fresh prefix of the same length, and
    of the hit's prompt sent again (repeat: a server that keeps a prompt's next-token logits runs no forward);
    no trial starts after `duration_limit` s. One token each: a server streams no chunk for a token that decodes
    to no text (a random model's ids past its tokenizer's vocabulary, a piece of a character), so with more the
    first chunk could come tokens later; the last chunk of a one-token request comes with its first token."""
    rng = random.Random(seed)
    hits, misses, errors, hit_cached, miss_cached, repeats, repeat_cached = [], [], [], [], [], [], []
    preps: list[float] = []   # the client's building and encoding of the hit, miss and repeat requests
    deadline = time.perf_counter() + duration_limit
    done = 0
    for _ in range(trials):
        if time.perf_counter() > deadline:
            break
        done += 1
        prefix = source.make(rng, prefix_len)
        prime = await stream_one(client, model, prefix + source.make(rng, suffix_len), max_tokens, ignore_eos)
        hit_prompt = prefix + source.make(rng, suffix_len)
        hit = await stream_one(client, model, hit_prompt, max_tokens, ignore_eos)
        miss = await stream_one(client, model, source.make(rng, prefix_len + suffix_len), max_tokens, ignore_eos)
        repeat = await stream_one(client, model, hit_prompt, max_tokens, ignore_eos)
        for r in (prime, hit, miss, repeat):
            if r.error:
                errors.append(r.error)
        preps += [r.client_prep for r in (hit, miss, repeat) if r.client_prep is not None and not r.error]
        if hit.ttft is not None and not hit.error:
            hits.append(hit.ttft)
            hit_cached.append(hit.cached_tokens)
        if miss.ttft is not None and not miss.error:
            misses.append(miss.ttft)
            miss_cached.append(miss.cached_tokens)
        if repeat.ttft is not None and not repeat.error:
            repeats.append(repeat.ttft)
            repeat_cached.append(repeat.cached_tokens)
    hit50, miss50, repeat50 = percentile(hits, 50), percentile(misses, 50), percentile(repeats, 50)
    return {"prefix_len": prefix_len, "suffix_len": suffix_len, "trials": done,
            "hit_ttft_p50_ms": None if hit50 is None else round(hit50 * 1e3, 3),
            "miss_ttft_p50_ms": None if miss50 is None else round(miss50 * 1e3, 3),
            "miss_over_hit": round(miss50 / hit50, 2) if hit50 and miss50 else None,
            "hit_cached_tokens": hit_cached, "miss_cached_tokens": miss_cached,
            "repeat_ttft_p50_ms": None if repeat50 is None else round(repeat50 * 1e3, 3),
            "miss_over_repeat": round(miss50 / repeat50, 2) if repeat50 and miss50 else None,
            "repeat_cached_tokens": repeat_cached,
            "client_prep_p50_ms": None if not preps else round(percentile(preps, 50) * 1e3, 3),
            "errors": len(errors), "error_messages": sorted(set(errors))[:5]}


# ----------------------------------------------------------------------------------------------- servers

def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name: value} for unlabelled samples (labelled ones keep their label text)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)", line)
        if m:
            with contextlib.suppress(ValueError):
                out[m.group(1)] = float(m.group(2))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server to measure: an already running one (`url`) or a command started here on 127.0.0.1 and stopped
    afterwards. A command without --port/--host gets them appended; `{port}` in it is replaced."""

    def __init__(self, label: str, url: str | None = None, launch: str | None = None, startup_timeout: float = 600):
        self.label, self.url, self.launch, self.startup_timeout = label, url, launch, startup_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path: str | None = None
        self.model: str | None = None

    def command(self, port: int) -> list[str]:
        argv = shlex.split(self.launch.replace("{port}", str(port)))
        if argv and argv[0] == "dsv4":   # the checkout's dsv4, whatever is on PATH
            argv = [sys.executable, "-m", "dsv4", *argv[1:]]
        if "--port" not in argv and not any(a.startswith("--port=") for a in argv):
            argv += ["--port", str(port)]
        if "--host" not in argv and not any(a.startswith("--host=") for a in argv):
            argv += ["--host", "127.0.0.1"]
        return argv

    def start(self) -> None:
        import httpx
        if self.launch:
            port = free_port()
            argv = self.command(port)
            fd, self.log_path = tempfile.mkstemp(prefix=f"serve_{self.label}_", suffix=".log")
            print(f"[{self.label}] starting: {shlex.join(argv)}  (log: {self.log_path})", flush=True)
            self.proc = subprocess.Popen(argv, stdout=fd, stderr=subprocess.STDOUT, start_new_session=True)
            os.close(fd)
            self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log_tail(200)
                lines = [ln for ln in tail.splitlines() if ln.strip()]
                last = next((ln for ln in reversed(lines) if re.search(r"error|no such|exception", ln, re.I)),
                            lines[-1] if lines else "")
                raise RuntimeError(f"[{self.label}] the server exited with {self.proc.returncode} before answering "
                                   f"({last.strip()[:240]})\n" + tail)
            for path in ("/health", "/v1/models"):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(self.url + path, timeout=2).status_code == 200:
                        return self._find_model()
            if time.monotonic() > deadline:
                raise RuntimeError(f"[{self.label}] no answer from {self.url}/health within "
                                   f"{self.startup_timeout:.0f} s"
                                   + ("\n" + self.log_tail() if self.proc else ""))
            time.sleep(0.5)

    def _find_model(self) -> None:
        import httpx
        if self.model:
            return
        with contextlib.suppress(Exception):
            data = httpx.get(self.url + "/v1/models", timeout=10).json()["data"]
            self.model = data[0]["id"]
        self.model = self.model or "default"

    def metrics(self) -> dict[str, float] | None:
        import httpx
        try:
            r = httpx.get(self.url + "/metrics", timeout=10)
        except httpx.HTTPError:
            return None
        return parse_metrics(r.text) if r.status_code == 200 else None

    def log_tail(self, n: int = 30) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> "Server":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def checkpoint_of(launch: str | None) -> str | None:
    """The `--checkpoint DIR` of a launch command, if it has one."""
    argv = shlex.split(launch) if launch else []
    for i, a in enumerate(argv):
        if a == "--checkpoint" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--checkpoint="):
            return a.split("=", 1)[1]
    return None


def vocab_from_launch(launch: str | None) -> int | None:
    """vocab_size from config.json of the `--checkpoint DIR` in a launch command, if there is one."""
    ckpt = checkpoint_of(launch)
    if ckpt:
        with contextlib.suppress(OSError, ValueError, KeyError):
            with open(os.path.join(ckpt, "config.json")) as f:
                return int(json.load(f)["vocab_size"])
    return None


# ----------------------------------------------------------------------------------------------- runs

def make_client(url: str, timeout: float, concurrency: int):
    import httpx
    from openai import AsyncOpenAI
    limits = httpx.Limits(max_connections=max(concurrency, 1) + 4, max_keepalive_connections=max(concurrency, 1) + 4)
    return AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="none", timeout=timeout, max_retries=0,
                       http_client=httpx.AsyncClient(limits=limits, timeout=timeout,
                                                     event_hooks={"request": [_mark_sent]}))


async def measure_server(server: Server, args, vocab: int, *, loads: bool = True, prefix: bool = True) -> dict:
    """Warm-up, the load levels and the prefix test against one running server."""
    out: dict = {"label": server.label, "url": server.url, "model": server.model, "launch": server.launch}
    caps = out["capabilities"] = await probe(server.url, server.model, vocab, args.request_timeout)
    gaps = {k: v for k, v in caps.items() if v != "ok"}
    if gaps:
        print(f"[{server.label}] could not: " + json.dumps(gaps), flush=True)
    as_text = caps[PROBE_IDS] != "ok" and caps[PROBE_TEXT] == "ok"
    source = prompt_source(args, vocab, as_text)
    ignore_eos = not args.no_ignore_eos and not caps[PROBE_EOS].startswith("HTTP")
    out.update(prompt_format="text" if as_text else "token ids", ignore_eos_sent=ignore_eos)
    if as_text or not ignore_eos:
        print(f"[{server.label}] prompts as {out['prompt_format']}, ignore_eos "
              f"{'sent' if ignore_eos else 'not sent'}", flush=True)
    client = make_client(server.url, args.request_timeout, max(args.concurrency))
    try:
        warm = await stream_one(client, server.model, source.make(random.Random(0), min(args.prompt_len)),
                                min(args.max_tokens, 8), ignore_eos)
        out["warmup_error"] = warm.error
        if warm.error:
            print(f"[{server.label}] warm-up failed: {warm.error}", flush=True)
        levels = []
        if loads:
            for plen in args.prompt_len:
                for conc in args.concurrency:
                    n = args.requests_per_level or max(2 * conc, 4)
                    common = dict(concurrency=conc, prompt_len=plen, max_tokens=args.max_tokens, n_requests=n,
                                  duration_limit=args.duration_limit, source=source, seed=args.seed + plen + conc,
                                  ignore_eos=ignore_eos)
                    if args.client_procs > 1 and conc > 1:
                        lvl = await asyncio.to_thread(run_level_procs, server.url, server.model,
                                                      procs=args.client_procs, timeout=args.request_timeout,
                                                      **common)
                    else:
                        lvl = await run_level(client, server.model, **common)
                    print(f"[{server.label}] " + json.dumps(lvl), flush=True)
                    levels.append(lvl)
        out["levels"] = levels
        if prefix and args.prefix_len:
            before = server.metrics()
            pt = await prefix_test(client, server.model, prefix_len=args.prefix_len, suffix_len=args.suffix_len,
                                   trials=args.prefix_trials, source=source, seed=args.seed + 7,
                                   ignore_eos=ignore_eos, duration_limit=args.duration_limit)
            after = server.metrics()
            pt["server_hit_rate_since_start"] = (after or {}).get("dsv4_prefix_cache_hit_rate")
            if before and after and "dsv4_prefix_cache_lookup_tokens_total" in after:
                looked = after["dsv4_prefix_cache_lookup_tokens_total"] - before.get(
                    "dsv4_prefix_cache_lookup_tokens_total", 0)
                hit = after.get("dsv4_prefix_cache_hit_tokens_total", 0) - before.get(
                    "dsv4_prefix_cache_hit_tokens_total", 0)
                pt["server_hit_rate_during_test"] = round(hit / looked, 4) if looked else None
            print(f"[{server.label}] prefix " + json.dumps(pt), flush=True)
            out["prefix"] = pt
        out["metrics_available"] = server.metrics() is not None
    finally:
        await client.close()
    return out


PROBE_TEXT, PROBE_IDS = "POST /v1/completions (text)", "POST /v1/completions (token ids)"
PROBE_EOS = "POST /v1/completions ignore_eos"


def prompt_source(args, vocab: int, as_text: bool) -> PromptSource:
    """Random ids (or text), or windows of --prompt-text tokenized with the launched checkpoint's tokenizer."""
    tokenizer = load_text_tokenizer(args) if as_text or args.prompt_text else None
    text_ids = None
    if args.prompt_text:
        if tokenizer is None:
            raise ValueError("--prompt-text needs a tokenizer: --tokenizer, or a --checkpoint DIR with tokenizer.json")
        with open(args.prompt_text, encoding="utf-8", errors="replace") as f:
            text_ids = tokenizer.encode(f.read(), add_special_tokens=False).ids
    return PromptSource(vocab, as_text=as_text, tokenizer=tokenizer, text_ids=text_ids)


def load_text_tokenizer(args):
    """The `tokenizers` tokenizer text prompts are made with: --tokenizer, else the launched checkpoint's."""
    path = args.tokenizer or checkpoint_of(args.launch)
    if path and os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not path or not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(path)


async def probe(url: str, model: str, vocab: int, timeout: float) -> dict[str, str]:
    """What a server answers on each endpoint this benchmark (and an OpenAI client) uses: 'ok' or what went
    wrong, so a peer's gaps are reported instead of ending the run."""
    import httpx
    out: dict[str, str] = {}
    ids = random_prompt(random.Random(1), 8, vocab)
    checks = [("GET /health", "get", "/health", None), ("GET /v1/models", "get", "/v1/models", None),
              ("GET /metrics", "get", "/metrics", None),
              (PROBE_TEXT, "post", "/v1/completions",
               {"model": model, "prompt": "Hello there", "max_tokens": 4, "temperature": 0}),
              (PROBE_IDS, "post", "/v1/completions",
               {"model": model, "prompt": ids, "max_tokens": 4, "temperature": 0}),
              (PROBE_EOS, "post", "/v1/completions",
               {"model": model, "prompt": "Hello there", "max_tokens": 4, "temperature": 0, "ignore_eos": True}),
              ("POST /v1/chat/completions", "post", "/v1/chat/completions",
               {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})]
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as http:
        for name, method, path, body in checks:
            try:
                r = await (http.get(path) if method == "get" else http.post(path, json=body))
                out[name] = "ok" if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:160]}"
                if r.status_code == 200 and name.endswith("ignore_eos"):
                    got = (r.json().get("usage") or {}).get("completion_tokens")
                    if got is not None and got < 4:
                        out[name] = f"accepted, but {got} of 4 tokens generated (ignore_eos not honoured?)"
            except Exception as e:  # noqa: BLE001
                out[name] = _error_text(e)
    return out


def spec_acceptance(before: dict | None, after: dict | None) -> float | None:
    """Accepted / drafted speculative tokens between two /metrics scrapes (None when not reported)."""
    if not after:
        return None
    d = after.get("dsv4_spec_drafted_tokens_total", 0) - (before or {}).get("dsv4_spec_drafted_tokens_total", 0)
    a = after.get("dsv4_spec_accepted_tokens_total", 0) - (before or {}).get("dsv4_spec_accepted_tokens_total", 0)
    return round(a / d, 4) if d else None


async def single_stream(server: Server, args, vocab: int) -> dict:
    client = make_client(server.url, args.request_timeout, 1)
    try:
        source = prompt_source(args, vocab, as_text=False)
        await stream_one(client, server.model, source.make(random.Random(0), min(args.prompt_len)), 8)
        before = server.metrics()
        lvl = await run_level(client, server.model, concurrency=1, prompt_len=min(args.prompt_len),
                              max_tokens=args.max_tokens, n_requests=args.requests_per_level or 4,
                              duration_limit=args.duration_limit, source=source, seed=args.seed,
                              ignore_eos=not args.no_ignore_eos, keep_texts=True)
        lvl["acceptance_rate"] = spec_acceptance(before, server.metrics())
        return lvl
    finally:
        await client.close()


def run_guarded(label: str, fn) -> dict:
    """A whole server's part of the run; a server that cannot start or answer is recorded, not fatal."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        print(f"[{label}] failed: {e}", flush=True)
        return {"label": label, "error": _error_text(e), "detail": str(e)[-2000:]}


def mtp_compare(args, vocab: int) -> dict:
    out = {}
    for label, launch in (("plain", args.launch), ("mtp", args.launch + " --speculative mtp")):
        def one(launch=launch, label=label):
            with Server(label, launch=launch, startup_timeout=args.startup_timeout) as s:
                return asyncio.run(single_stream(s, args, vocab))
        out[label] = run_guarded(label, one)
        print(f"[{label}] single stream " + json.dumps(out[label]), flush=True)
    p, m = out["plain"].get("output_tok_per_s"), out["mtp"].get("output_tok_per_s")
    out["speedup"] = round(m / p, 3) if p and m else None
    out["outputs"] = compare_texts(out["plain"].pop("texts", None), out["mtp"].pop("texts", None))
    return out


def compare_texts(plain: list[str] | None, spec: list[str] | None) -> dict | None:
    """Greedy MTP output against plain greedy output, request by request: how many are equal, and for each one that
    is not, the character where it first differs (a bf16 near-tie flips there; see bench/mtp_acceptance.py)."""
    if plain is None or spec is None:
        return None
    differ = {i: next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
              for i, (x, y) in enumerate(zip(plain, spec)) if x != y}
    return {"requests": min(len(plain), len(spec)), "equal": min(len(plain), len(spec)) - len(differ),
            "first_difference_char": differ}


# ----------------------------------------------------------------------------------------------- output

def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))


def table(result: dict) -> str:
    cols = ["server", "prompt", "conc", "reqs", "err", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "out tok/s"]
    rows = []
    for srv in result["servers"]:
        if "error" in srv and "levels" not in srv:
            rows.append([srv["label"], "-", "-", "-", "-", f"failed: {srv['error'][:200]}", "", "", "", ""])
            continue
        for lvl in srv.get("levels", []):
            rows.append([srv["label"], lvl["prompt_len"], lvl["concurrency"], lvl["requests"], lvl["errors"],
                         lvl["ttft_p50_ms"], lvl["ttft_p99_ms"], lvl["tpot_p50_ms"], lvl["tpot_p99_ms"],
                         lvl["output_tok_per_s"]])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    lines.append("(times in ms)")
    for srv in result["servers"]:
        pt = srv.get("prefix")
        if pt:
            lines.append(f"{srv['label']}: second turn over a {pt['prefix_len']}-token prefix: hit TTFT "
                         f"{_fmt(pt['hit_ttft_p50_ms'])} ms, miss TTFT {_fmt(pt['miss_ttft_p50_ms'])} ms, "
                         f"miss/hit {_fmt(pt['miss_over_hit'])}x, repeated prompt TTFT "
                         f"{_fmt(pt.get('repeat_ttft_p50_ms'))} ms, cached tokens reported hit "
                         f"{pt.get('hit_cached_tokens')} miss {pt.get('miss_cached_tokens')}, server hit rate during "
                         f"the test {_fmt(pt.get('server_hit_rate_during_test'))}, errors {pt['errors']} "
                         f"(TTFT from the send; the client built and encoded each request in "
                         f"{_fmt(pt.get('client_prep_p50_ms'))} ms before it)")
        if srv.get("prompt_format") == "text":
            lines.append(f"{srv['label']}: text prompts (its completions take no token ids): prompt lengths are "
                         "approximate, the JSON has mean_prompt_tokens per level")
        if srv.get("ignore_eos_sent") is False:
            lines.append(f"{srv['label']}: ignore_eos not sent: outputs may be shorter than max_tokens")
        for check, what in srv.get("capabilities", {}).items():
            if what != "ok":
                lines.append(f"{srv['label']} could not: {check}: {what}")
        for lvl in srv.get("levels", []):
            if lvl.get("short_outputs"):
                lines.append(f"{srv['label']} prompt {lvl['prompt_len']} conc {lvl['concurrency']}: "
                             f"{lvl['short_outputs']} outputs shorter than max_tokens")
            for msg, n in lvl.get("error_messages", {}).items():
                lines.append(f"{srv['label']} prompt {lvl['prompt_len']} conc {lvl['concurrency']}: {n} x {msg}")
    if "mtp" in result:
        m = result["mtp"]
        lines.append(f"single stream: plain {_fmt(m['plain'].get('output_tok_per_s'))} tok/s, MTP "
                     f"{_fmt(m['mtp'].get('output_tok_per_s'))} tok/s (speedup {_fmt(m['speedup'])}x, acceptance "
                     f"{_fmt(m['mtp'].get('acceptance_rate'))})"
                     + (f"; outputs equal to plain: {m['outputs']['equal']}/{m['outputs']['requests']}"
                        + (f" (first difference at character {m['outputs']['first_difference_char']})"
                           if m['outputs']['first_difference_char'] else "") if m.get('outputs') else "")
                     + (f"; MTP failed: {m['mtp']['error']}" if m['mtp'].get('error') else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- tiny CPU

def make_checkpoint(directory: str, preset: str = "tiny", mtp_layers: int | None = None,
                    official: bool = False) -> int:
    """A random-weights model with a small BPE tokenizer saved in `directory`; returns its vocab size.

    preset "tiny": the tiny preset with the tokenizer's vocab (fp32, for the CPU smoke). "flash4": the 4-layer
    V4-Flash geometry of bench/e2e.py (vocab 32768, bf16, built on the GPU when there is one); its ids beyond the
    small tokenizer decode to empty text, which the benchmark does not read (it counts tokens from `usage`).
    official: saved as the official checkpoints store it (FP4 routed experts, FP8 projections), which `dsv4 serve`
    holds natively on a GPU (--weights auto)."""
    import torch

    import dsv4
    from dsv4.train.tokenizer import train_bpe
    tok = train_bpe(["Hello there, how are you?\n", "Paris is the capital of France.\n"] * 20, 300, directory)
    if preset == "tiny":
        cfg, dtype = dsv4.ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size), torch.float32
    elif preset == "flash4":
        from e2e import flash4  # bench/e2e.py: the benchmark model's geometry
        cfg, dtype = flash4(), torch.bfloat16
    else:
        raise ValueError(f"preset={preset!r}: expected 'tiny' or 'flash4'")
    if mtp_layers is not None:
        cfg = cfg.replace(n_mtp_layers=mtp_layers)
    model = dsv4.Transformer(cfg).init_weights(seed=1)  # on the CPU: saving needs no GPU
    formats = dict(expert_format="fp4", fp8_weights=True) if official else {}
    dsv4.save_model(model, directory, dtype=dtype, **formats)
    return cfg.vocab_size


def make_tiny_checkpoint(directory: str) -> int:
    return make_checkpoint(directory, "tiny")


TINY_DEFAULTS = dict(concurrency=[1, 2], prompt_len=[16, 64], max_tokens=8, requests_per_level=4, prefix_len=96,
                     suffix_len=8, prefix_trials=1, duration_limit=60.0)


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--url", help="an already running server, e.g. http://127.0.0.1:8000")
    src.add_argument("--launch", help='a server command started here, e.g. "dsv4 serve --checkpoint ckpt"')
    src.add_argument("--tiny-cpu", action="store_true", help="smoke: serve a random tiny model on the CPU")
    p.add_argument("--peer-url", help="a second, already running server measured with the same load")
    p.add_argument("--peer-launch", help='a second server command, e.g. "transformers serve --port {port}"')
    p.add_argument("--peer-model", help="model id for the peer (default: the first of its /v1/models)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--prompt-len", type=int, nargs="+", default=[1024, 32768])
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--client-procs", type=int, default=1, help="split each level's load over N client processes, "
                   "each with its own event loop and openai client (one process parsing 64 streams' chunks can be "
                   "slower than the server); 1 = the whole load in this process")
    p.add_argument("--requests-per-level", type=int, default=None,
                   help="requests per level (default: 2 x concurrency, at least 4)")
    p.add_argument("--duration-limit", type=float, default=300.0, help="no new request of a level after S seconds")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds a launched server may take to answer")
    p.add_argument("--prefix-len", type=int, default=None, help="shared-prefix test length (default: longest prompt; "
                   "0 skips it)")
    p.add_argument("--suffix-len", type=int, default=64, help="tokens after the shared prefix in the prefix test")
    p.add_argument("--prefix-trials", type=int, default=3)
    p.add_argument("--mtp-compare", action="store_true",
                   help="single stream against --launch with and without --speculative mtp")
    p.add_argument("--mtp-only", action="store_true",
                   help="with --mtp-compare: only its two single-stream runs, not the load levels before them")
    p.add_argument("--vocab-size", type=int, help="random prompt ids are drawn from [0, V) (default: config.json of "
                   "the launched checkpoint)")
    p.add_argument("--no-ignore-eos", action="store_true", help="never send ignore_eos (it is left out anyway for a "
                   "server that rejects it)")
    p.add_argument("--prompt-text", metavar="FILE", help="prompts are windows of this text (tokenized with "
                   "--tokenizer or the checkpoint's) instead of random ids: in-distribution text for --mtp-compare "
                   "on a trained model")
    p.add_argument("--tokenizer", help="tokenizer.json (or its folder) for text prompts to a server whose completions "
                   "take no token ids (default: the launched checkpoint's; else random words)")
    p.add_argument("--make-checkpoint", metavar="DIR", help="only save a random-weights model with a tokenizer in DIR "
                   "(--preset) for --launch, then exit")
    p.add_argument("--preset", default="flash4", choices=["flash4", "tiny"], help="model of --make-checkpoint")
    p.add_argument("--mtp-layers", type=int, help="MTP blocks of the --make-checkpoint model (default: the preset's)")
    p.add_argument("--official", action="store_true",
                   help="save the --make-checkpoint model in the official formats (FP4 experts, FP8 projections)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="result file (default: bench/results/<date>_<device>_<commit>_serve.json)")
    args = p.parse_args(argv)
    if args.tiny_cpu:
        given = set(a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:]))
        for k, v in TINY_DEFAULTS.items():
            if k not in given:
                setattr(args, k, v)
    if args.make_checkpoint:
        return args
    if not (args.url or args.launch or args.tiny_cpu):
        p.error("one of --url, --launch or --tiny-cpu is needed")
    if args.mtp_only and not args.mtp_compare:
        p.error("--mtp-only needs --mtp-compare")
    if args.mtp_compare and not (args.launch or args.tiny_cpu):
        p.error("--mtp-compare starts the server twice: it needs --launch (or --tiny-cpu)")
    if args.prefix_len is None:
        args.prefix_len = max(args.prompt_len)
    for name in ("concurrency", "prompt_len"):
        if min(getattr(args, name)) < 1:
            p.error(f"--{name.replace('_', '-')}: values must be >= 1")
    if args.max_tokens < 1 or (args.requests_per_level is not None and args.requests_per_level < 1):
        p.error("--max-tokens and --requests-per-level must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_checkpoint:
        vocab = make_checkpoint(args.make_checkpoint, args.preset, args.mtp_layers, args.official)
        print(f"saved a random {args.preset} model (vocab {vocab}) with a tokenizer in {args.make_checkpoint}")
        return 0
    tmp = None
    if args.tiny_cpu:
        tmp = tempfile.TemporaryDirectory(prefix="dsv4_serve_tiny_")
        args.vocab_size = args.vocab_size or make_tiny_checkpoint(tmp.name)
        need = max(max(args.prompt_len), args.prefix_len + args.suffix_len) + args.max_tokens + 16
        args.launch = (f"dsv4 serve --checkpoint {shlex.quote(tmp.name)} --device cpu --max-batch "
                       f"{max(args.concurrency)} --max-seq-len {need} --model-name tiny --prefix-block 32")
    vocab = args.vocab_size or vocab_from_launch(args.launch) or vocab_from_launch(args.peer_launch)
    if not vocab:
        print("--vocab-size is needed (no --checkpoint DIR with config.json in the launch command)", file=sys.stderr)
        return 2
    result = {**record("cpu" if args.tiny_cpu else None), "bench": "serve", "vocab_size": vocab,
              "ignore_eos": not args.no_ignore_eos,
              "args": {k: v for k, v in vars(args).items() if k not in ("json",)}, "servers": []}
    try:
        primary = Server("dsv4", url=args.url, launch=args.launch, startup_timeout=args.startup_timeout)

        def run_primary():
            with primary:
                return asyncio.run(measure_server(primary, args, vocab))
        if not args.mtp_only:
            result["servers"].append(run_guarded("dsv4", run_primary))
        if args.peer_url or args.peer_launch:
            peer = Server("peer", url=args.peer_url, launch=args.peer_launch, startup_timeout=args.startup_timeout)
            peer.model = args.peer_model

            def run_peer():
                with peer:
                    return asyncio.run(measure_server(peer, args, vocab))
            result["servers"].append(run_guarded("peer", run_peer))
        if args.mtp_compare:
            result["mtp"] = mtp_compare(args, vocab)
    finally:
        if tmp is not None:
            tmp.cleanup()
    path = args.json or result_path("serve_tiny_cpu" if args.tiny_cpu else "serve",
                                    device="cpu" if args.tiny_cpu else None)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    print(table(result))
    print(f"results: {path}")
    return 0 if all("error" not in s for s in result["servers"]) else 1


if __name__ == "__main__":
    sys.exit(main())
