"""Where a prefix-cache hit's time-to-first-token goes, on the serving engine (no HTTP): a request over prefix P
+ suffix A primes the cache, then P + suffix B (a hit: P restored, B prefilled in one forward) and P + suffix B
again (a whole-prompt hit: no forward, the first token from the stored logits) are timed, each split into the
prompt check at submit, the prefix-cache load (lookup + restore), the saves on the way, the model forwards and
the rest (sampling, engine bookkeeping). Also times validating the /v1/completions body of a prompt of that many
token ids.

    python bench/prefix_hit_profile.py [--prefix-len 8192] [--suffix-len 64] [--block 2048] [--preset tiny]
                                       [--checkpoint DIR] [--device cpu|cuda] [--trials 3] [--cprofile] [--stub-model]
                                       [--prefill-graphs N]

Prints a table (ms) and, with --cprofile, the top functions of the hit by cumulative time. `--stub-model` swaps
the model's forward for one that only advances the cache and returns zero logits: what is left is the host's
path around the forwards (prompt check, lookup, restore, saves, sampling, bookkeeping), fast to time on a CPU.
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import json
import pstats
import statistics
import time

import torch

import dsv4
from dsv4.serve.engine import Engine
from dsv4.serve.prefix_cache import PrefixCache
from dsv4.serve.protocol import CompletionRequest
from dsv4.serve.types import SamplingParams


class Timers:
    """Wall time per name, summed over calls (a CUDA sync before and after each call on a GPU), up to the request's
    first event (`first[0]`, once set): what runs after it is not part of the time to first token."""

    def __init__(self, device: torch.device, first: list[float]):
        self.ms: dict[str, float] = collections.defaultdict(float)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.first = first

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **k):
            self.sync()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.sync()
                end = min(time.perf_counter(), self.first[0]) if self.first else time.perf_counter()
                self.ms[name] += max(end - t, 0.0) * 1e3
        setattr(obj, attr, timed)


class StubForward(dsv4.Transformer):
    """The model with a forward that computes nothing: it advances the cache's rows (their stored state stays as
    it was) and returns zero logits, so a timed request measures everything but the model."""

    def forward(self, tokens: torch.Tensor, cache=None, last_only: bool = False) -> torch.Tensor:
        if cache is not None:
            cache.begin(tokens.shape)
            cache.end(tokens.shape[1])
        n = 1 if last_only else tokens.shape[1]
        return torch.zeros(tokens.shape[0], n, self.config.vocab_size, device=tokens.device)


def first_token_ms(engine: Engine, prompt: list[int], max_tokens: int,
                   first: list[float] | None = None) -> tuple[float, object]:
    """Submit to the moment the first event is pushed to the request's stream (the engine stepped in this thread;
    the rest of that step, e.g. storing saves, is not in it), then run the request out. `first` receives that
    moment."""
    first = [] if first is None else first
    first.clear()
    t = time.perf_counter()
    handle = engine.submit(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    push = handle._push

    def timed_push(event) -> None:
        if not first:
            first.append(time.perf_counter())
        push(event)
    handle._push = timed_push
    while not handle._events:
        engine.step()
    ttft = (first[0] - t) * 1e3
    engine.run_until_idle()
    return ttft, handle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefix-len", type=int, default=8192)
    p.add_argument("--suffix-len", type=int, default=64)
    p.add_argument("--block", type=int, default=2048, help="the prefix cache's save interval (dsv4 serve's default: "
                   "the prefill chunk)")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--preset", default="tiny", help="a random model of this preset (without --checkpoint)")
    p.add_argument("--checkpoint", help="a checkpoint directory (e.g. bench/serve.py --make-checkpoint /tmp/flash4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trials", type=int, default=3, help="hits timed (medians reported)")
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--stub-model", action="store_true", help="forwards that only advance the cache (the host path)")
    p.add_argument("--prefill-graphs", type=int, default=0, metavar="N",
                   help="Engine(prefill_graphs=N): chunks up to N tokens as padded graph replays (dsv4 serve's flag)")
    args = p.parse_args()
    device = torch.device(args.device)
    need = args.prefix_len + 2 * args.suffix_len + args.max_tokens + 16
    if args.checkpoint:
        from dsv4.checkpoint import load_model
        model = load_model(args.checkpoint, device=device,
                           dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
        cfg = model.config
    else:
        cfg = dsv4.ModelConfig.preset(args.preset).replace(max_seq_len=max(need, 4096))
        with torch.device(device):
            model = dsv4.Transformer(cfg).init_weights(seed=1).eval()
    if args.stub_model:
        model.__class__ = StubForward
    pc = PrefixCache(model, 4 << 30, 2 << 30, block=args.block, verify_model=False)
    # decode replays graphs on a GPU as the server's does: with the overlapped loop a first token is handed out
    # after the next decode step's launch, which without graphs would be a whole eager forward
    engine = Engine(model, max_batch=2, max_seq_len=need, prefill_chunk=2048, cuda_graphs=device.type == "cuda",
                    prefix_cache=pc, batch_invariant=device.type != "cuda",   # (as `dsv4 serve`)
                    **({"prefill_graphs": args.prefill_graphs} if args.prefill_graphs else {}))
    graphs = getattr(engine, "prefill_graphs", None)   # (None: off, or a tree without them)
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    prefix = rand(args.prefix_len)
    first_token_ms(engine, rand(16), 2)   # warm-up (kernels, allocator)
    prime_ms, _ = first_token_ms(engine, prefix + rand(args.suffix_len), args.max_tokens)
    if graphs is not None:   # a hit's suffix size on its row: one eager step, then the capture
        for _ in range(2):
            first_token_ms(engine, prefix + rand(args.suffix_len), 1)

    first: list[float] = []
    timers = Timers(device, first)
    timers.wrap(engine, "_prompt_ids", "submit: prompt check")
    timers.wrap(pc, "load_full", "prefix load (lookup + restore)")
    timers.wrap(pc, "save", "prefix saves")
    timers.wrap(pc, "snapshot", "prefix saves")        # (a save's copy, stored later ...)
    timers.wrap(pc, "save_snapshot", "prefix saves")   # (... here, from the next step on)
    timers.wrap(engine, "model", "model forwards")
    if graphs is not None:
        timers.wrap(graphs, "run", "model forwards")
    timers.wrap(engine, "_emit", "sample + emit (incl. forward wait)")
    prof = cProfile.Profile() if args.cprofile else None
    runs: dict[str, list] = {"hit": [], "whole-prompt hit": []}
    for _ in range(args.trials):   # hits over the same prefix with other suffixes, each sent twice; medians
        hit_prompt = prefix + rand(args.suffix_len)
        for kind in runs:
            timers.ms.clear()
            if prof:
                prof.enable()
            ms, handle = first_token_ms(engine, hit_prompt, 1, first)
            if prof:
                prof.disable()
            split = dict(timers.ms)
            split["other (engine bookkeeping)"] = ms - sum(split.values())
            runs[kind].append((ms, split, handle.cached_tokens))

    body = json.dumps({"model": "m", "prompt": hit_prompt, "max_tokens": 8, "stream": True})
    t = time.perf_counter()
    for _ in range(10):
        req = CompletionRequest.model_validate_json(body)
        list(req.single_prompt())
    api_ms = (time.perf_counter() - t) * 1e2
    print(f"prefix {args.prefix_len} + suffix {args.suffix_len} tokens, block {args.block}, "
          f"{args.checkpoint or args.preset}{' (stub forwards)' if args.stub_model else ''} on {device}")
    print(f"  prime (miss) TTFT {prime_ms:9.1f} ms")
    for kind, rs in runs.items():
        keys = [k for k in rs[0][1] if all(k in r[1] for r in rs)]
        print(f"  {kind} TTFT {statistics.median(r[0] for r in rs):9.1f} ms (median of {len(rs)}; cached "
              f"{rs[-1][2]} of {args.prefix_len + args.suffix_len} tokens)")
        for k in keys:
            print(f"    {k:38s} {statistics.median(r[1][k] for r in rs):8.1f} ms")
    print(f"  API body parse + validate (separate) {api_ms:8.1f} ms")
    if graphs is not None:
        print(f"  padded prefill steps: {graphs.counters}")
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
