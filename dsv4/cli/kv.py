"""KV-cache memory per layer type at a context length, against DeepSeek-V3.2 and a BF16 GQA model.

    dsv4 kv --preset flash --context 1048576
    dsv4 kv --checkpoint path/to/model --context 131072 --kv-dtype bf16 --index-dtype bf16 --json
    dsv4 kv --preset flash --preset pro --plot kv.png
"""
from __future__ import annotations

import argparse
import json

from ..config import ModelConfig
from ..errors import InvalidArgument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", action="append", help="flash, pro, small or tiny (repeat to plot several)")
    p.add_argument("--checkpoint", help="a checkpoint directory (only its config.json is read)")
    p.add_argument("--context", type=int, default=1 << 20, help="tokens in the sequence (default 1M)")
    p.add_argument("--kv-dtype", default="fp8", choices=["fp8", "bf16", "fp32"])
    p.add_argument("--index-dtype", default="fp4", choices=["fp4", "fp8", "bf16", "fp32"])
    p.add_argument("--json", action="store_true", help="print one JSON object (the first model)")
    p.add_argument("--plot", metavar="PNG", help="also draw KV GiB vs context (1K..1M) to this file")


def run(args: argparse.Namespace) -> int:
    from ..cache.accounting import format_kv_report, kv_report, plot_kv

    if not args.preset and not args.checkpoint:
        raise InvalidArgument("give --preset NAME or --checkpoint DIR")
    if args.context <= 0:
        raise InvalidArgument(f"--context must be positive, got {args.context}")
    models = {name: ModelConfig.preset(name) for name in args.preset or []}
    if args.checkpoint:
        models[args.checkpoint] = ModelConfig.from_pretrained(args.checkpoint)
    for i, (name, cfg) in enumerate(models.items()):
        rep = kv_report(cfg, args.context, args.kv_dtype, args.index_dtype)
        if args.json:
            if i == 0:
                print(json.dumps(rep))
        else:
            print(format_kv_report(name, rep) + "\n")
    if args.plot:
        plot_kv(models, args.plot, args.kv_dtype, args.index_dtype)
    return 0
