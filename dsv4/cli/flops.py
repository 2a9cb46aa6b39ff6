"""Inference FLOPs of one decode token at a context length, by component, against DeepSeek-V3.2.

    dsv4 flops --preset pro --context 1048576
    dsv4 flops --preset flash --json
    dsv4 flops --preset flash --preset pro --plot flops.png

Matmul FLOPs (2 per multiply-add) of the forward step, as dsv4's cached decode runs it; see dsv4/info/flops.py for
what is counted and what (element-wise work, MTP) is not.
"""
from __future__ import annotations

import argparse

from .model_choice import add_model_arguments, chosen_models, print_reports


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, "positions the decode token attends to (default 1M)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the first model)")
    p.add_argument("--plot", metavar="PNG", help="also draw GFLOPs per token vs context (1K..1M) to this file")


def run(args: argparse.Namespace) -> int:
    from ..info.flops import flops_report, format_flops_report, plot_flops

    models = chosen_models(args)
    print_reports(models, args.json, lambda cfg: flops_report(cfg, args.context), format_flops_report)
    if args.plot:
        plot_flops(models, args.plot)
    return 0
