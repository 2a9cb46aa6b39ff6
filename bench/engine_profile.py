"""Where a serving engine step's time goes, in one process (no HTTP): the 4-layer V4-Flash-geometry model on the
GPU, one 1K-token prompt then decode at batch 1 and 64, with and without batch-invariant mode and the prefix cache.

    python bench/engine_profile.py [--prompt-len 1024] [--max-tokens 64] [--batch 1 64]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import build_model  # noqa: E402

from dsv4.serve.engine import Engine  # noqa: E402
from dsv4.serve.prefix_cache import PrefixCache  # noqa: E402
from dsv4.serve.types import SamplingParams  # noqa: E402


def run(model, *, batch: int, prompt_len: int, max_tokens: int, invariant: bool, prefix: bool) -> dict:
    pc = PrefixCache(model, 4 << 30, 0, block=256) if prefix else None
    eng = Engine(model, max_batch=max(batch, 1), max_seq_len=prompt_len + max_tokens + 8, prefix_cache=pc,
                 batch_invariant=invariant)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    eng.submit(prompts[0][:64], SamplingParams(max_tokens=4, temperature=0))  # warm-up: kernels, graphs
    eng.run_until_idle()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    hs = [eng.submit(p, params) for p in prompts]
    steps = 0
    while eng.has_work:
        eng.step()
        steps += 1
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    toks = sum(len([e for e in h if e.token is not None]) for h in hs)
    return dict(batch=batch, invariant=invariant, prefix=prefix, wall_s=round(wall, 3), steps=steps,
                tokens=toks, tok_per_s=round(toks / wall, 1), ms_per_step=round(1e3 * wall / steps, 2),
                counters=eng.counters)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--json")
    a = p.parse_args()
    model = build_model()
    out = []
    for batch in a.batch:
        for invariant in (False, True):
            for prefix in (False, True):
                r = run(model, batch=batch, prompt_len=a.prompt_len, max_tokens=a.max_tokens, invariant=invariant,
                        prefix=prefix)
                print(json.dumps(r), flush=True)
                out.append(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
