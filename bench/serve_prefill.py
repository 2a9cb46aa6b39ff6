"""Prefill throughput of the serving engine: N prompts submitted together, prefilled batched (equal-length chunks
of several requests in one forward, the engine's mode with batch_invariant off) against one request per forward
(its mode with batch_invariant on). Each request asks for one token, so the time is the prefill's.

    python bench/serve_prefill.py --preset tiny --device cpu --prompts 16 --prompt-len 256
    python bench/serve_prefill.py --preset flash4 --device cuda --prompts 64 --prompt-len 1024

Prints one line per mode: seconds, prompt tokens/s, forwards (the prefill ones and their mean rows, and the decodes:
with `--overlap` on, the GPU default, each finished row is decoded once more in the next step, whose token budget
then fits one chunk less: `--overlap on off` compares); and the speedup. `--max-seq-len` sizes the
cache rows as a server would (`dsv4 serve --max-seq-len`; default: the prompt plus one token) and `--prefix-block N`
puts a prefix cache in front (saves every N tokens and at each prompt's end, as `dsv4 serve` does); several values
of each are compared in one run, to tell what of a server's prefill time the row capacity and the saves cost:

    python bench/serve_prefill.py --preset flash4 --device cuda --prompts 64 --prompt-len 1024 --modes batched \
        --overlap on off \
        --max-seq-len 0 33280 --prefix-block 0 2048
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

import dsv4
from dsv4.serve.engine import Engine
from dsv4.serve.prefix_cache import PrefixCache
from dsv4.serve.types import SamplingParams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import flash4  # noqa: E402  (bench/e2e.py: the geometry bench/serve.py serves)


def run(model, prompts: list[list[int]], batched: bool, args, max_seq_len: int = 0, prefix_block: int = 0,
        overlap: str = "auto") -> tuple[float, int, int, int]:
    """Seconds to serve the prompts, and the forwards: all of them, the prefill ones (more than one token per row)
    and the rows those ran."""
    pc = PrefixCache(model, 1 << 30, 0, block=prefix_block, verify_model=False) if prefix_block else None
    engine = Engine(model, max_batch=len(prompts), max_seq_len=max_seq_len or args.prompt_len + 1,
                    prefill_chunk=args.chunk, step_token_budget=args.budget, max_prefill_rows=args.max_prefill_rows,
                    cuda_graphs=False, batch_invariant=False, prefix_cache=pc,
                    overlap={"auto": None, "on": True, "off": False}[overlap])
    engine.batched_prefill = batched   # decode never runs (one token each): only the prefill mode differs
    forwards = [0, 0, 0]   # forwards, prefill forwards, their rows
    real = model.forward

    def counted(tokens, *a, **kw):
        forwards[0] += 1
        if tokens.shape[1] > 1:
            forwards[1] += 1
            forwards[2] += tokens.shape[0]
        return real(tokens, *a, **kw)
    model.forward = counted
    try:
        handles = [engine.submit(p, SamplingParams(max_tokens=1, temperature=0)) for p in prompts]
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.run_until_idle()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    finally:
        del model.forward
    assert all(list(h)[-1].finish_reason == "length" for h in handles)
    return seconds, *forwards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "flash4"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--budget", type=int, default=8192)
    p.add_argument("--max-prefill-rows", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, nargs="+", default=[0],
                   help="cache row capacities to compare (0, the default: prompt length + 1)")
    p.add_argument("--prefix-block", type=int, nargs="+", default=[0],
                   help="prefix cache save intervals to compare (0, the default: no prefix cache)")
    p.add_argument("--modes", nargs="+", default=["one", "batched"], choices=["one", "batched"])
    p.add_argument("--overlap", nargs="+", default=["auto"], choices=["auto", "on", "off"],
                   help="the engine's overlaps to compare (auto: its default, on with a GPU). With overlap a request's "
                        "end is seen a step late, so each prompt's row is decoded once more, in the next step's budget")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per mode (the best is kept; a warm-up first)")
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = dsv4.ModelConfig.preset("tiny") if args.preset == "tiny" else flash4()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = dsv4.Transformer(cfg).init_weights(seed=0).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    tokens = args.prompts * args.prompt_len
    print(f"{args.preset} on {device}: {args.prompts} prompts x {args.prompt_len} tokens, chunk {args.chunk}, "
          f"budget {args.budget}, max_prefill_rows {args.max_prefill_rows}, torch {torch.__version__}")
    for max_seq_len, block, overlap in itertools.product(args.max_seq_len, args.prefix_block, args.overlap):
        print(f" rows of {max_seq_len or args.prompt_len + 1} tokens, prefix cache "
              f"{f'saving every {block}' if block else 'off'}, overlap {overlap}:")
        best = {}
        for batched in [m == "batched" for m in args.modes]:
            run(model, prompts[:2], batched, args, max_seq_len, block, overlap)   # warm-up
            times = [run(model, prompts, batched, args, max_seq_len, block, overlap)
                     for _ in range(args.repeats)]
            seconds, forwards, prefills, rows = min(times)
            best[batched] = seconds
            name = "batched" if batched else "one per forward"
            print(f"  {name:16s} {seconds:8.3f} s  {tokens / seconds:10.0f} prompt tok/s  {forwards} forwards "
                  f"({prefills} prefill of {rows / max(prefills, 1):.1f} rows on average, "
                  f"{forwards - prefills} decode)")
        if len(best) == 2:
            print(f"  speedup {best[False] / best[True]:.2f}x")


if __name__ == "__main__":
    main()
