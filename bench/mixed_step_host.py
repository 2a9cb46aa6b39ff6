"""The host cost of a serving engine's "mixed" step, by part, on any device (the CPU is enough: the parts are Python
and dispatcher work, the same on a GPU): the step that decodes the running rows, hands out R requests that finish
(their events, their end-of-request prefix-cache snapshots) and prefills R new prompts of T tokens in one batched
forward (their first tokens, their prompt-end snapshots), as the c=64 serving level's 15 mixed steps do with R = 8
and T = 1,024 (bench/results/2026-12-07_h100_*_serve_c64_trace_summary.txt).

    python bench/mixed_step_host.py [--rows 1 2 4 8] [--tokens 64] [--lengths 8 32 128] [--repeats 5] [--out FILE]

Model: bench/e2e.py flash4()'s structure (4 layers, compress ratios 4, 128, 4, 128, window 128, indexer top-512,
16 routed experts top-6 + 1 shared, no hash layers, no MTP) at ModelConfig.preset("tiny")'s dimensions, fp32.

Three tables:

  forward  one batched prefill forward of R rows x T tokens on a cache holding a first chunk already: its ops
           (`ops`: each dsv4.ops call and cache codec counted as one op and its CPU reference's aten ops not at
           all, the other aten ops one each, views excluded: about a GPU's kernel launches; `aten`: every aten op)
           and its host ms, for R in --rows at --tokens in all, then for T in --lengths at the largest R;
  step     the mixed step (engine with a prefix cache, overlap on, batched prefill: the GPU serving defaults) split
           into parts (one row per code path, nested parts apart: a parent's figures exclude its children's), each
           with its calls, ops and host ms per step and, for R > 1, per finishing or prefilling row;
  summary  per R: the step's ops and ms, and those of the parts that scale with R.

Host ms are the fastest of --repeats (a shared CPU is noisy); ops come from a separate run under a dispatch counter
(which slows Python down, so it is never timed). On a CPU the forward's ms include its (tiny) arithmetic; on a GPU
each op is a launch of ~5-40 us of host time. What the GPU run that confirms a change looks like: `bash
bench/gpu_session.sh serve64` (the c=64 level with its step trace; the trace summary's mixed-step `other host` and
the finishing steps' hand-out and save ms), and `python bench/mixed_step_host.py --device cuda` for the same parts
with a GPU's launches.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

import numpy as np
import torch

import dsv4
from dsv4.serve.engine import Engine
from dsv4.serve.prefix_cache import PrefixCache
from dsv4.serve.types import SamplingParams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import flash4  # noqa: E402
from provenance import record, result_path  # noqa: E402
from spec_step_count import OpCounter  # noqa: E402


def tiny_flash4() -> dsv4.ModelConfig:
    """flash4's layer structure and routing (16 experts, top-6) at the `tiny` preset's dimensions."""
    t = dsv4.ModelConfig.preset("tiny")
    return flash4(vocab=t.vocab_size).replace(
        dim=t.dim, n_heads=t.n_heads, head_dim=t.head_dim, rope_head_dim=t.rope_head_dim, q_lora_rank=t.q_lora_rank,
        o_groups=t.o_groups, o_lora_rank=t.o_lora_rank, index_n_heads=t.index_n_heads,
        index_head_dim=t.index_head_dim, moe_inter_dim=t.moe_inter_dim, n_activated_experts=6, expert_dtype=None)


# ------------------------------------------------------------------ parts of a step
# (object attribute, label): the engine's and the prefix cache's methods timed as parts of the step; a name a
# version of the tree does not have is skipped, so the script runs on the trees it compares
ENGINE_PARTS = [("_reap_cancelled", "cancellations"), ("_decode", "decode"), ("_deliver", "hand-out"),
                ("_finish", "finish"), ("_save_at_end", "end snapshot"), ("_end_saves", "end snapshots"),
                ("_prefill", "prefill"), ("_admit", "admit"), ("_load_prefix", "prefix lookup"),
                ("_prefill_rows", "prefill rows"), ("_emit", "emit"), ("_save_prefix", "prompt-end snapshot"),
                ("_prompt_saves", "prompt-end snapshots"), ("_drain_saves", "drain saves")]
CACHE_PARTS = [("snapshot", "pc.snapshot"), ("snapshot_rows", "pc.snapshot_rows"),
               ("save_snapshot", "pc.save_snapshot"), ("load_full", "pc.load_full")]


class Parts:
    """Exclusive host time and ops per nested part: a part's time and ops are what ran in it outside its children.
    `path` is the stack of open parts ("step/prefill/prefill rows/forward")."""

    def __init__(self):
        self.stack = ["step"]
        self.ms: Counter = Counter()
        self.calls: Counter = Counter()
        self.ops: Counter = Counter()
        self._t = time.perf_counter()

    @property
    def path(self) -> str:
        return "/".join(self.stack)

    def _charge(self) -> None:
        now = time.perf_counter()
        self.ms[self.path] += 1e3 * (now - self._t)
        self._t = now

    def enter(self, label: str) -> None:
        self._charge()
        self.stack.append(label)
        self.calls[self.path] += 1

    def leave(self) -> None:
        self._charge()
        self.stack.pop()

    def restart(self) -> None:
        self.stack, self._t = ["step"], time.perf_counter()


def wrap(obj, attr: str, label: str, parts: Parts) -> bool:
    """obj.attr (if it has one) timed as part `label`, as an attribute of the instance (`delattr` undoes it)."""
    fn = getattr(obj, attr, None)
    if fn is None:
        return False

    def timed(*a, **k):
        parts.enter(label)
        try:
            return fn(*a, **k)
        finally:
            parts.leave()
    setattr(obj, attr, timed)
    return True


class PartOps(OpCounter):
    """OpCounter whose ops go to the open part."""

    def __init__(self, parts: Parts, ops_as_kernels: bool = True):
        super().__init__(ops_as_kernels)
        self.parts = parts

    def count(self, name: str) -> None:
        self.parts.ops[self.parts.path] += 1


# ------------------------------------------------------------------ the mixed step
def mixed_engine(model, rows: int, length: int, max_tokens: int) -> Engine:
    """2R rows: R decoding requests that end in the measured step, R prompts of `length` tokens prefilled in it (one
    chunk each, all in one forward); a prefix cache whose block is longer than the prompts (the save at a prompt's
    end and at a request's end, as `dsv4 serve` with 1K prompts and its 2K block)."""
    pc = PrefixCache(model, 1 << 30, 0, block=4096, verify_model=False)
    return Engine(model, max_batch=2 * rows, max_seq_len=length + max_tokens + 8, prefill_chunk=max(length, 16),
                  step_token_budget=rows * length + 2 * rows, max_prefill_rows=rows, cuda_graphs=False,
                  batch_invariant=False, overlap=True, prefix_cache=pc, saves_per_step=2)


def to_mixed_step(engine: Engine, rows: int, length: int, max_tokens: int, seed: int) -> list:
    """Run R requests until the next step hands out their last tokens, then queue R new prompts; returns the
    handles of the R requests that end in the next step."""
    g = np.random.default_rng(seed)
    vocab = engine.vocab_size

    def submit() -> list:
        return [engine.submit(g.integers(0, vocab, length).tolist(), SamplingParams(max_tokens=max_tokens,
                                                                                    temperature=0, ignore_eos=True))
                for _ in range(rows)]
    ending = submit()
    for _ in range(10 * max_tokens + 20):
        live = [r for r in engine._rows if r is not None]
        if len(live) == rows and all(len(r.generated) == max_tokens - 1 for r in live) and engine._pending:
            break
        engine.step()
    else:
        raise RuntimeError("the requests did not reach their last step")
    submit()
    return ending


def measure_step(model, rows: int, length: int, max_tokens: int, repeats: int, count: bool) -> dict:
    """The mixed step's parts: per part (path) calls, ms (fastest repeat) and, with `count`, ops."""
    best: dict[str, float] = {}
    calls: Counter = Counter()
    ops: Counter = Counter()
    totals = []
    for rep in range(repeats + count + 1):   # (the first run warms up; with `count` the last one counts ops)
        engine = mixed_engine(model, rows, length, max_tokens)
        ending = to_mixed_step(engine, rows, length, max_tokens, seed=rep)
        parts = Parts()
        wrapped = [(obj, attr) for obj, table in ((engine, ENGINE_PARTS), (engine.prefix_cache, CACHE_PARTS),
                                                  (model, [("forward", "forward")]))
                   for attr, label in table if wrap(obj, attr, label, parts)]
        counting = count and rep == repeats + 1
        counter = PartOps(parts) if counting else None
        try:
            if counter is not None:
                counter.__enter__()
            if engine.device.type == "cuda":   # (the step's wait for earlier results: none left, host time alone)
                torch.cuda.synchronize()
            parts.restart()
            t0 = time.perf_counter()
            engine.step()
            parts._charge()
            total = 1e3 * (time.perf_counter() - t0)
        finally:
            if counter is not None:
                counter.__exit__(None, None, None)
            for obj, attr in wrapped:
                delattr(obj, attr)
        if not all(h.finished for h in ending):
            raise RuntimeError("the measured step did not end the requests it was set up to end")
        if engine.counters["prefill_tokens"] < 2 * rows * length:
            raise RuntimeError("the measured step did not prefill the queued prompts")
        if counting:
            ops = parts.ops
        elif rep:
            totals.append(total)
            calls = Counter(parts.calls)
            for k, v in parts.ms.items():
                best[k] = min(best.get(k, v), v)
        engine.run_until_idle()
        engine.stop()
    return {"rows": rows, "length": length, "step_ms": round(min(totals), 3),
            "parts": {k: {"calls": calls.get(k, 0), "ms": round(best.get(k, 0.0), 3), "ops": ops.get(k, 0)}
                      for k in sorted(set(best) | set(ops))}}


# ------------------------------------------------------------------ one forward
@torch.no_grad()
def measure_forward(model, rows: int, length: int, repeats: int) -> dict:
    """One batched prefill forward of rows x length tokens after a first chunk of the same shape: ops and host ms."""
    device = model.embed.weight.device
    ids = torch.randint(0, model.config.vocab_size, (rows, length))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def primed():
        cache = model.new_cache(rows, 2 * length + 8)
        model(ids, cache=cache, last_only=True)
        return cache
    counts = {}
    for kernels, name in ((True, "ops"), (False, "aten")):
        cache = primed()
        counter = OpCounter(kernels)
        with counter:
            model(ids, cache=cache, last_only=True)
        counts[name] = sum(counter.ops.values())
    times = []
    for _ in range(repeats):
        cache = primed()
        sync()
        t0 = time.perf_counter()
        model(ids, cache=cache, last_only=True)
        times.append(1e3 * (time.perf_counter() - t0))   # (host time: the launches, not the GPU's work)
    return {"rows": rows, "length": length, **counts, "host_ms": round(min(times), 3)}


# ------------------------------------------------------------------ report
SCALING = ("hand-out", "finish", "end snapshot", "end snapshots", "admit", "prefix lookup", "prompt-end snapshot",
           "prompt-end snapshots", "emit", "pc.snapshot", "pc.snapshot_rows", "drain saves", "pc.save_snapshot",
           "pc.load_full")


def step_table(rec: dict) -> list[str]:
    rows = rec["rows"]
    lines = [f"mixed step, R={rows} ending + R={rows} prompts of {rec['length']} tokens: {rec['step_ms']:.2f} ms "
             f"(fastest), {sum(p['ops'] for p in rec['parts'].values())} ops",
             f"  {'part (path)':62s} {'calls':>5s} {'ops':>6s} {'ms':>8s} {'ops/row':>8s} {'us/row':>8s}"]
    for path, p in rec["parts"].items():
        lines.append(f"  {path:62s} {p['calls']:5d} {p['ops']:6d} {p['ms']:8.3f} {p['ops'] / rows:8.1f} "
                     f"{1e3 * p['ms'] / rows:8.1f}")
    return lines


def summary_line(rec: dict) -> str:
    parts = rec["parts"]

    def total(key: str, labels) -> float:
        return sum(p[key] for path, p in parts.items() if path.rsplit("/", 1)[-1] in labels)
    fwd = {k: sum(p[k] for path, p in parts.items() if path.endswith("prefill rows/forward")) for k in ("ops", "ms")}
    return (f"R={rec['rows']:2d}: step {sum(p['ops'] for p in parts.values()):5d} ops {rec['step_ms']:8.2f} ms | "
            f"prefill forward {fwd['ops']:4d} ops {fwd['ms']:7.2f} ms | per-row parts (hand-out, snapshots, "
            f"admission, emit, drain) {total('ops', SCALING):5.0f} ops {total('ms', SCALING):7.2f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--tokens", type=int, default=64, help="tokens per forward in the R sweep (T = tokens / R)")
    p.add_argument("--lengths", type=int, nargs="+", default=[8, 32, 128], help="T per row in the T sweep")
    p.add_argument("--step-length", type=int, default=16, help="prompt tokens per row in the mixed step")
    p.add_argument("--max-tokens", type=int, default=4, help="tokens each ending request generates")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-count", action="store_true", help="time only (no op-counting run)")
    p.add_argument("--out", help="write the report here too (default: bench/results/<date>_<device>_<commit>_"
                                 "mixed_step_host.txt; '-' for none)")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = dsv4.Transformer(tiny_flash4()).init_weights(seed=0).to(device).to_dtype(dtype).eval()
    lines = [f"# bench/mixed_step_host.py {' '.join(sys.argv[1:])}: {json.dumps(record(args.device))}, torch "
             f"{torch.__version__}, {torch.get_num_threads()} thread(s)"]

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)
    say("## forward: one batched prefill forward (R rows x T tokens), ops ~ GPU launches, aten = every aten op")
    for rows in args.rows:
        say(json.dumps({"sweep": "rows", **measure_forward(model, rows, args.tokens // rows, args.repeats)}))
    for length in args.lengths:
        say(json.dumps({"sweep": "length", **measure_forward(model, max(args.rows), length, args.repeats)}))
    say("## step: the mixed step by part (a part's figures exclude its children's)")
    recs = []
    for rows in args.rows:
        rec = measure_step(model, rows, args.step_length, args.max_tokens, args.repeats, not args.no_count)
        recs.append(rec)
        for line in step_table(rec):
            say(line)
    say("## summary")
    for rec in recs:
        say(summary_line(rec))
    if args.out != "-":
        path = args.out or result_path("mixed_step_host", "txt", device=args.device)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
