"""What one batched prefill forward of R rows x L tokens costs on the host, against one row of R * L tokens: the
serving engine's step that prefills R prompts of L tokens together (each asking for one token), counted on any
device (CPU is enough) for R in --rows at the same total tokens. Per step: the aten ops of the model's forward
(`forward_ops`) and of the whole step (`step_ops`: the forward, the first tokens' sampling, the prefix saves),
with `--ops-as-kernels` (the default here) each dsv4.ops call and cache record codec counted as one op and the
aten ops of its CPU reference not at all, approximating a GPU's kernel launches (bench/spec_step_count.py); the
host syncs (tensor -> Python value) and blocking host -> device tensor builds; and the step's host seconds.
A cost that grows with R is a per-row cost (a Python loop over rows, a launch per row).

    python bench/prefill_rows_count.py [--tokens 2048] [--rows 1 2 4 8 16] [--prefix-block 0 512] [--full-depth]
                                       [--scattered] [--cprofile 15]
    python bench/prefill_rows_count.py --preset flash4 --device cuda --tokens 8192   # a GPU's launch counts

The default model has bench/e2e.py flash4()'s structure (compress ratios 4, 128, 4, 128; window 128; no hash
layers, no MTP) at dimensions a CPU runs in a second. `--prefix-block N` puts a prefix cache in front that saves
every N tokens (as `dsv4 serve` does): its saves run in the step and are counted with it.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch

import dsv4
from dsv4.serve.engine import Engine
from dsv4.serve.prefix_cache import PrefixCache
from dsv4.serve.types import SamplingParams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import flash4  # noqa: E402
from spec_step_count import HostCounter, OpCounter  # noqa: E402


SCATTERED = False   # --scattered


def small_flash4(full_depth: bool = False) -> dsv4.ModelConfig:
    """flash4's layer structure (ratios 4, 128, 4, 128; window 128; top-k 512) at CPU-sized dimensions; with
    `full_depth`, V4-Flash's 43 layers and their ratios (per-layer costs at the real depth)."""
    depth = dict(n_layers=43, compress_ratios=(0, 0) + (4, 128) * 20 + (4,)) if full_depth else {}
    return flash4(vocab=1024).replace(**depth, dim=64, n_heads=2, head_dim=64, rope_head_dim=16, q_lora_rank=32,
                                      o_groups=2, o_lora_rank=32, index_n_heads=4, index_head_dim=32,
                                      n_routed_experts=4, n_activated_experts=2, moe_inter_dim=32,
                                      n_shared_experts=1, expert_dtype=None)


def engine_for(model, rows: int, length: int, prefix_block: int) -> Engine:
    pc = PrefixCache(model, 1 << 30, 0, block=prefix_block, verify_model=False) if prefix_block else None
    return Engine(model, max_batch=2 * rows if SCATTERED else rows, max_seq_len=length + 1, prefill_chunk=length,
                  step_token_budget=rows * length, max_prefill_rows=rows, cuda_graphs=False, batch_invariant=False,
                  prefix_cache=pc)


def submitted(model, rows: int, length: int, prefix_block: int, seed: int = 0) -> tuple[Engine, list]:
    """An engine with `rows` prompts of `length` random tokens queued (one token each)."""
    engine = engine_for(model, rows, length, prefix_block)
    if SCATTERED:   # every other row busy: the prompts get rows 1, 3, 5 .. (a gathered copy of the rows)
        for r in range(2 * rows):
            engine.pool.take()
        for r in range(1, 2 * rows, 2):
            engine.pool.free(r)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, model.config.vocab_size, (length,), generator=g).tolist() for _ in range(rows)]
    return engine, [engine.submit(p, SamplingParams(max_tokens=1, temperature=0)) for p in prompts]


def unblock(engine: Engine) -> None:
    """Free the rows `--scattered` kept busy."""
    if SCATTERED:
        for r in range(0, engine.max_batch, 2):
            engine.pool.free(r)


def timed(model, rows: int, length: int, prefix_block: int, profile: cProfile.Profile | None = None) -> float:
    """Milliseconds of the step that prefills the prompts (uncounted; the device drained before and after)."""
    engine, handles = submitted(model, rows, length, prefix_block)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    if profile is not None:
        profile.enable()
    engine.step()
    if profile is not None:
        profile.disable()
    sync()
    seconds = time.perf_counter() - t0
    unblock(engine)
    engine.run_until_idle()
    assert all(list(h)[-1].finish_reason == "length" for h in handles)
    return 1e3 * seconds


def count(model, rows: int, length: int, prefix_block: int, ops_as_kernels: bool) -> dict:
    """One engine step prefilling `rows` prompts of `length` tokens in one forward: its op and sync counts."""
    engine, handles = submitted(model, rows, length, prefix_block)
    fwd = OpCounter(ops_as_kernels)
    real = model.forward
    forwards = [0]

    def counted(*a, **k):   # the forward's ops apart: a nested counter sees them too
        forwards[0] += 1
        with fwd:
            return real(*a, **k)
    model.forward = counted
    host, ops = HostCounter(), OpCounter(ops_as_kernels)
    try:
        with host, ops:
            engine.step()
    finally:
        del model.forward
    unblock(engine)
    engine.run_until_idle()   # (the prefix cache's queued saves)
    assert all(list(h)[-1].finish_reason == "length" for h in handles)
    return {"rows": rows, "length": length, "forwards": forwards[0], "forward_ops": sum(fwd.ops.values()),
            "step_ops": sum(ops.ops.values()), "syncs": sum(v for k, v in host.counts.items() if k.startswith("sync")),
            **{k: v for k, v in sorted(host.counts.items())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small-flash4", choices=["small-flash4", "flash4"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per forward (R rows of tokens / R each)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--prefix-block", type=int, nargs="+", default=[0])
    p.add_argument("--full-depth", action="store_true", help="small-flash4 at V4-Flash's 43 layers and ratios")
    p.add_argument("--scattered", action="store_true",
                   help="the prompts on every other row (rows 1, 3, ..): one forward over a gathered copy of them")
    p.add_argument("--aten", action="store_true", help="count the references' aten ops, not one per dsv4.ops call")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per row count (the fastest is kept)")
    p.add_argument("--cprofile", type=int, default=0, help="list the top N host functions of each step")
    args = p.parse_args()
    global SCATTERED
    SCATTERED = args.scattered
    device = torch.device(args.device)
    cfg = small_flash4(args.full_depth) if args.preset == "small-flash4" else flash4()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    model = dsv4.Transformer(cfg).init_weights(seed=0).to(device=device, dtype=dtype).eval()
    print(f"{args.preset} on {device}, {args.tokens} tokens per forward, torch {torch.__version__}")
    for block in args.prefix_block:
        for rows in args.rows:
            length = args.tokens // rows
            timed(model, rows, length, block)   # warm-up (a GPU's kernel compiles for these shapes)
            rec = count(model, rows, length, block, not args.aten)
            ms = min(timed(model, rows, length, block) for _ in range(args.repeats))
            print(json.dumps({"prefix_block": block, **rec, "step_ms": round(ms, 2)}), flush=True)
            if args.cprofile:
                prof = cProfile.Profile()
                timed(model, rows, length, block, prof)
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.cprofile)
                print(out.getvalue())


if __name__ == "__main__":
    main()
