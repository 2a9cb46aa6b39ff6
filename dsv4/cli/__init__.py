"""`dsv4` command line: thin shells over the Python API (one module per subcommand)."""
from __future__ import annotations

import argparse
import sys

from . import chat, compare, generate, info, kv, train

_COMMANDS = {"train": train, "generate": generate, "chat": chat, "info": info, "kv": kv, "compare": compare}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 in PyTorch: train, run and study.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, mod in _COMMANDS.items():
        mod.add_arguments(sub.add_parser(name, help=mod.__doc__.strip().splitlines()[0],
                                         description=mod.__doc__))
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command].run(args) or 0
    except (ValueError, RuntimeError, OSError) as e:
        print(f"dsv4 {args.command}: error: {e}", file=sys.stderr)
        return 2
