"""KV-cache memory per layer type at a context length, against DeepSeek-V3.2 and a BF16 GQA model.

    dsv4 kv --preset flash --context 1048576
    dsv4 kv --checkpoint path/to/model --context 131072 --kv-dtype bf16 --index-dtype bf16 --json
    dsv4 kv --preset flash --preset pro --plot kv.png
"""
from __future__ import annotations

import argparse

from .model_choice import add_model_arguments, chosen_models, print_reports


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, "tokens in the sequence (default 1M)")
    p.add_argument("--kv-dtype", default="fp8", choices=["fp8", "bf16", "fp32"])
    p.add_argument("--index-dtype", default="fp4", choices=["fp4", "fp8", "bf16", "fp32"])
    p.add_argument("--json", action="store_true", help="print one JSON object (the first model)")
    p.add_argument("--plot", metavar="PNG", help="also draw KV GiB vs context (1K..1M) to this file")


def run(args: argparse.Namespace) -> int:
    from ..cache.accounting import format_kv_report, kv_report, plot_kv

    models = chosen_models(args)
    print_reports(models, args.json, lambda cfg: kv_report(cfg, args.context, args.kv_dtype, args.index_dtype),
                  format_kv_report)
    if args.plot:
        plot_kv(models, args.plot, args.kv_dtype, args.index_dtype)
    return 0
