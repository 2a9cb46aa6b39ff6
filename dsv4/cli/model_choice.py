"""The model choice `dsv4 kv` and `dsv4 flops` share: presets and/or a checkpoint's config, a context length, and
one report per model (or the first model's as JSON)."""
from __future__ import annotations

import argparse
import json
from typing import Callable

from ..config import ModelConfig
from ..errors import InvalidArgument


def add_model_arguments(p: argparse.ArgumentParser, context_help: str) -> None:
    p.add_argument("--preset", action="append", help="flash, pro, small or tiny (repeat to plot several)")
    p.add_argument("--checkpoint", help="a checkpoint directory (only its config.json is read)")
    p.add_argument("--context", type=int, default=1 << 20, help=context_help)


def chosen_models(args: argparse.Namespace) -> dict[str, ModelConfig]:
    """name -> config of every --preset and the --checkpoint, after checking the choice and --context."""
    if not args.preset and not args.checkpoint:
        raise InvalidArgument("give --preset NAME or --checkpoint DIR")
    if args.context <= 0:
        raise InvalidArgument(f"--context must be positive, got {args.context}")
    models = {name: ModelConfig.preset(name) for name in args.preset or []}
    if args.checkpoint:
        models[args.checkpoint] = ModelConfig.from_pretrained(args.checkpoint)
    return models


def print_reports(models: dict[str, ModelConfig], as_json: bool, report: Callable[[ModelConfig], dict],
                  text: Callable[[str, dict], str]) -> None:
    """One text report per model, or the first model's report as one JSON object."""
    for i, (name, cfg) in enumerate(models.items()):
        if as_json:
            if i == 0:
                print(json.dumps(report(cfg)))
        else:
            print(text(name, report(cfg)) + "\n")
