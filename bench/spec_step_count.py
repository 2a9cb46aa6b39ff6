"""Count what one speculative decode step costs on the host, on any device (CPU is enough): the aten ops it runs
(each one a kernel launch on a GPU), the host syncs (tensor -> Python value: .tolist(), .item(), int/float/bool
of a tensor) and the host -> device tensor builds (torch.tensor from Python data). Compare with a plain decode
step of the same engine. Launch-bound single-stream decoding is as fast as these counts are small.

    python bench/spec_step_count.py [--preset tiny] [--n-draft 1] [--steps 6] [--prompt 40]
"""
from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import dsv4
from dsv4.serve.engine import Engine
from dsv4.serve.types import SamplingParams

SYNCS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
         torch.Tensor.__float__, torch.Tensor.__index__}


class HostCounter(TorchFunctionMode):
    """Counts tensor -> host transfers and tensors built from Python data."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCS:
            self.counts["sync:" + func.__name__] += 1
        elif func is torch.tensor:
            self.counts["host_to_device"] += 1
        return func(*args, **(kwargs or {}))


class OpCounter(TorchDispatchMode):
    """Counts aten ops (views and metadata ops excluded: they launch nothing)."""

    FREE = {"view", "_unsafe_view", "t", "transpose", "unsqueeze", "squeeze", "expand", "slice", "select",
            "permute", "as_strided", "alias", "detach", "reshape", "unbind", "split", "chunk", "lift_fresh",
            "_reshape_alias", "split_with_sizes", "empty", "empty_like", "empty_strided"}

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] not in self.FREE:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def count_steps(engine: Engine, steps: int) -> dict:
    totals, n = Counter(), 0
    for _ in range(steps):
        if not engine.has_work:
            break
        host, ops = HostCounter(), OpCounter()
        with host, ops:
            engine.step()
        totals.update(host.counts)
        totals["aten_ops"] += ops.ops
        n += 1
    syncs = sum(v for k, v in totals.items() if k.startswith("sync:"))
    return {"steps": n, "per_step": {k: round(v / max(n, 1), 1) for k, v in sorted(totals.items())},
            "syncs_per_step": round(syncs / max(n, 1), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--n-draft", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=40)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = dsv4.Transformer(dsv4.ModelConfig.preset(args.preset)).init_weights(seed=0).eval()
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt,)).tolist()
    out = {}
    for label, kw in (("plain", {}), ("mtp", {"speculative": "mtp", "n_draft": args.n_draft})):
        engine = Engine(model, max_batch=1, max_seq_len=args.prompt + 4 * args.steps + 16, prefill_chunk=args.prompt,
                        **kw)
        engine.submit(prompt, SamplingParams(max_tokens=4 * args.steps, temperature=0))
        engine.step()                                  # the prefill (and, plain, the first token)
        engine.step()                                  # one decode step not counted (first-step setup)
        out[label] = count_steps(engine, args.steps)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
