"""Parameter counts (total / activated, per layer type) of a preset or checkpoint.

    dsv4 info --preset flash
    dsv4 info --checkpoint path/to/model --json
"""
from __future__ import annotations

import argparse
import json

from ..config import ModelConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="flash, pro, small or tiny")
    src.add_argument("--checkpoint", help="a checkpoint directory (only its config.json is read)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from ..info import format_report, param_report

    cfg = ModelConfig.preset(args.preset) if args.preset else ModelConfig.from_pretrained(args.checkpoint)
    rep = param_report(cfg)
    if args.json:
        print(json.dumps(rep))
    else:
        print(format_report(args.preset or args.checkpoint, rep))
    return 0
