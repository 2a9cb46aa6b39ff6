"""Inference FLOPs of one decode token at a context length, by component, against DeepSeek-V3.2.

    dsv4 flops --preset pro --context 1048576
    dsv4 flops --preset flash --json
    dsv4 flops --preset flash --preset pro --plot flops.png

Matmul FLOPs (2 per multiply-add) of the forward step, as dsv4's cached decode runs it; see dsv4/info/flops.py for
what is counted and what (element-wise work, MTP) is not.
"""
from __future__ import annotations

import argparse
import json

from ..config import ModelConfig
from ..errors import InvalidArgument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", action="append", help="flash, pro, small or tiny (repeat to plot several)")
    p.add_argument("--checkpoint", help="a checkpoint directory (only its config.json is read)")
    p.add_argument("--context", type=int, default=1 << 20, help="positions the decode token attends to (default 1M)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the first model)")
    p.add_argument("--plot", metavar="PNG", help="also draw GFLOPs per token vs context (1K..1M) to this file")


def run(args: argparse.Namespace) -> int:
    from ..info.flops import flops_report, format_flops_report, plot_flops

    if not args.preset and not args.checkpoint:
        raise InvalidArgument("give --preset NAME or --checkpoint DIR")
    if args.context <= 0:
        raise InvalidArgument(f"--context must be positive, got {args.context}")
    models = {name: ModelConfig.preset(name) for name in args.preset or []}
    if args.checkpoint:
        models[args.checkpoint] = ModelConfig.from_pretrained(args.checkpoint)
    for i, (name, cfg) in enumerate(models.items()):
        rep = flops_report(cfg, args.context)
        if args.json:
            if i == 0:
                print(json.dumps(rep))
        else:
            print(format_flops_report(name, rep) + "\n")
    if args.plot:
        plot_flops(models, args.plot)
    return 0
