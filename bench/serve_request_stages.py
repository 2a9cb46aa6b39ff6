"""Where the host's time goes on a long prompt's way from request to first token, through the real server: the
tiny model (forwards stubbed: they only advance the cache) behind `dsv4.serve.api` on uvicorn at 127.0.0.1, with a
prefix cache, and the official `openai` client sending token ids as `bench/serve.py` does. Each prompt is sent once
to prime the cache, then again (a whole-prompt hit: nothing to compute), and the repeat is split into stages by
timestamps taken in the client, the ASGI app, the handler and the engine (one clock: perf_counter is the system's
monotonic clock on Linux). The client runs in a process of its own, as a load generator does: in the server's
process its parsing of the response would take the GIL from the engine and the event loop and be counted as theirs.
The stub's logits pick a token that decodes to text, so the first event is the first chunk's (a token decoding to
nothing sends no chunk, and the chunk would wait for the next step). The server runs with `dsv4 serve`'s GIL switch
interval (`--switch-interval`).

    python bench/serve_request_stages.py [--lengths 1024 8192 32768] [--trials 5] [--block 2048] [--max-tokens 1]

Prints a table of per-stage medians (ms) per prompt length, plus the body's parse and validation timed apart.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "serve"))

import dsv4  # noqa: E402
from dsv4.cli.serve import SWITCH_INTERVAL_S  # noqa: E402
from dsv4.serve import api as api_mod  # noqa: E402
from dsv4.serve.engine import Engine  # noqa: E402
from dsv4.serve.handle import RequestHandle  # noqa: E402
from dsv4.serve.prefix_cache import PrefixCache  # noqa: E402
from dsv4.serve.protocol import CompletionRequest  # noqa: E402
from prefix_hit_profile import StubForward  # noqa: E402

MARKS: dict[str, float] = {}


def mark(name: str) -> None:
    MARKS.setdefault(name, time.perf_counter())


def timed(obj, attr: str, name: str) -> None:
    """Record the first call's start and end of obj.attr as `name` and `name` + ' end'."""
    fn = getattr(obj, attr)

    def wrapper(*a, **k):
        mark(name)
        try:
            return fn(*a, **k)
        finally:
            mark(name + " end")
    setattr(obj, attr, wrapper)


def asgi_marks(app):
    """The app with the request's arrival, its last body byte and its first streamed chunk marked."""
    async def wrapped(scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            return await app(scope, receive, send)
        mark("server: request arrives")

        async def rx():
            msg = await receive()
            if msg["type"] == "http.request" and not msg.get("more_body"):
                mark("server: body read")
            return msg

        async def tx(msg):
            if msg["type"] == "http.response.body" and b'"choices": [{' in msg.get("body", b""):
                mark("server: first chunk sent")
            await send(msg)
        return await app(scope, rx, tx)
    return wrapped


def mark_first_push() -> None:
    """RequestHandle._push (every handle's) marking the first token event."""
    orig = RequestHandle._push

    def push(handle, event):
        if event.token is not None:
            mark("engine: first event")
        return orig(handle, event)
    RequestHandle._push = push


class TextStub(StubForward):
    """StubForward whose logits make `text_id` the greedy token (zero logits pick id 0, which decodes to nothing)."""
    text_id: int = 0

    def forward(self, tokens: torch.Tensor, cache=None, last_only: bool = False) -> torch.Tensor:
        logits = super().forward(tokens, cache, last_only)
        logits[..., self.text_id] = 1.0
        return logits


async def one(client, prompt: list[int], max_tokens: int) -> dict[str, float]:
    """A streamed request as bench/serve.py sends it; the client's marks."""
    from serve import stream_one
    res = await stream_one(client, "m", prompt, max_tokens)
    assert not res.error, res.error
    return {"client: start": res.start, "client: request sent": res.sent, "client: first chunk": res.chunk_times[0]}


def client_process(conn, url: str, lengths: list[int], trials: int, seed: int, max_tokens: int) -> None:
    """The load generator, in its own process: per length, `trials` prompts each sent twice (a prime, then the timed
    repeat); before each repeat it asks the server's process to clear its marks, after it sends its own."""
    from serve import make_client

    async def run() -> None:
        client = make_client(url, 60, 1)   # (it stamps each request's send: RequestResult.sent)
        rng = random.Random(seed)
        for n in lengths:
            for _ in range(trials):
                prompt = [rng.randrange(2, 300) for _ in range(n)]
                await one(client, prompt, max_tokens)   # prime
                await asyncio.sleep(0.05)   # (the engine stores the save)
                conn.send(("clear", n))
                conn.recv()
                conn.send(("marks", n, await one(client, prompt, max_tokens)))
                conn.recv()
                await asyncio.sleep(0.02)
    try:
        asyncio.run(run())
    finally:
        conn.send(("done", 0))


def split(marks: dict[str, float]) -> dict[str, float]:
    """Consecutive stage durations (ms) from the marks."""
    order = ["client: start", "client: request sent", "server: request arrives", "server: body read",
             "handler: entered", "engine.submit", "engine._prompt_ids", "engine._prompt_ids end",
             "engine.submit end", "engine: load_full", "engine: load_full end", "engine: first event",
             "server: first chunk sent", "client: first chunk"]
    names = ["client builds + sends", "server: headers in", "server: body in", "parse + validate (FastAPI)",
             "handler -> submit", "submit: before check", "engine._prompt_ids", "submit: rest",
             "engine loop -> lookup", "prefix load_full", "lookup -> first event", "event -> chunk sent",
             "chunk -> client"]
    t = [marks.get(k) for k in order]
    out = {}
    for i, name in enumerate(names):
        if t[i] is not None and t[i + 1] is not None:
            out[name] = (t[i + 1] - t[i]) * 1e3
    out["TTFT as bench/serve.py reports it"] = (marks["client: first chunk"] - marks["client: request sent"]) * 1e3
    out["first chunk - call (old TTFT)"] = (marks["client: first chunk"] - marks["client: start"]) * 1e3
    return out


def parse_costs(prompt: list[int], reps: int = 5) -> dict[str, float]:
    """The body's costs timed apart (ms): the client's JSON encoding, json.loads, pydantic validation."""
    body = {"model": "m", "prompt": prompt, "max_tokens": 2, "stream": True, "temperature": 0.0,
            "stream_options": {"include_usage": True}}

    def best(fn) -> float:
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts) * 1e3
    raw = json.dumps(body).encode()
    parsed = json.loads(raw)
    return {"json.dumps": best(lambda: json.dumps(body)), "json.loads": best(lambda: json.loads(raw)),
            "model_validate(dict)": best(lambda: CompletionRequest.model_validate(parsed)),
            "model_validate_json": best(lambda: CompletionRequest.model_validate_json(raw))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--block", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=1,
                   help="tokens per request (bench/serve.py's prefix test asks for 1)")
    p.add_argument("--switch-interval", type=float, default=SWITCH_INTERVAL_S,
                   help="sys.setswitchinterval in the server's process (dsv4 serve's default)")
    args = p.parse_args()
    sys.setswitchinterval(args.switch_interval)
    from http_server import ServerThread
    from dsv4.train.tokenizer import train_bpe
    import tempfile

    need = max(args.lengths) + 64
    cfg = dsv4.ModelConfig.preset("tiny").replace(max_seq_len=need)
    model = dsv4.Transformer(cfg).init_weights(seed=1).eval()
    tok = train_bpe(["Hello there, how are you?\n"] * 20, 300, tempfile.mkdtemp())
    model.__class__ = TextStub
    model.text_id = next(i for i in range(cfg.vocab_size) if tok.decode([i], skip_special=True))
    pc = PrefixCache(model, 4 << 30, 2 << 30, block=args.block, verify_model=False)
    engine = Engine(model, max_batch=2, max_seq_len=need, prefill_chunk=2048, prefix_cache=pc, overlap=False)
    app = api_mod.build_app(engine, tok, "m")
    srv = app.state.server
    timed(srv, "check_model", "handler: entered")
    timed(engine, "submit", "engine.submit")
    timed(engine, "_prompt_ids" if hasattr(engine, "_prompt_ids") else "_check_prompt",   # (older trees: _check_prompt)
          "engine._prompt_ids")
    timed(pc, "load_full", "engine: load_full")
    mark_first_push()
    server = ServerThread(asgi_marks(app))
    server.start()
    engine.start()
    stages: dict[int, list[dict[str, float]]] = {n: [] for n in args.lengths}
    here, there = multiprocessing.Pipe()
    client = multiprocessing.get_context("spawn").Process(
        target=client_process, args=(there, server.url, args.lengths, args.trials, 0, args.max_tokens), daemon=True)
    try:
        client.start()
        while True:
            kind, n, *rest = here.recv()
            if kind == "done":
                break
            if kind == "clear":
                MARKS.clear()
            else:
                stages[n].append(split({**MARKS, **rest[0]}))
            here.send("ok")
        client.join(timeout=30)
        if client.exitcode != 0:
            raise RuntimeError(f"the client process failed (exit code {client.exitcode})")
    finally:
        engine.stop()
        server.stop()
    rows = []
    g = random.Random(1)
    for n in args.lengths:
        keys = [k for k in stages[n][0] if all(k in s for s in stages[n])]
        prompt = [g.randrange(2, 300) for _ in range(n)]
        rows.append((n, {k: statistics.median(s[k] for s in stages[n]) for k in keys}, parse_costs(prompt)))
    names = list(rows[0][1]) + list(rows[0][2])
    print(f"{'stage (ms, median of %d repeats)' % args.trials:40s}" + "".join(f"{n:>10d}" for n, _, _ in rows))
    for k in names:
        print(f"{k:40s}" + "".join(f"{(s | c).get(k, float('nan')):10.2f}" for _, s, c in rows))


if __name__ == "__main__":
    main()
