"""`dsv4` command line: thin shells over the Python API (one module per subcommand).

The subcommand modules import torch, matplotlib and the model only inside `run`, so `dsv4 --help` and
`dsv4 <command> --help` answer at once. Bad input ends in one line, `dsv4 <command>: error: <message>`, and
exit status 2, without a traceback; `--debug` or DSV4_DEBUG=1 prints the traceback too.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from ..errors import DsV4Error
from . import chat, compare, distill, flops, generate, grpo, info, kv, posttrain, serve, sft, train

_COMMANDS = {"train": train, "generate": generate, "chat": chat, "info": info, "kv": kv, "flops": flops,
             "compare": compare, "serve": serve, "sft": sft, "grpo": grpo, "distill": distill,
             "posttrain": posttrain}

# Reported in one line: dsv4's own errors (a bad value, file or checkpoint), the environment's (a missing file,
# a full disk, a missing optional package), and the ValueError / RuntimeError that code below the command line
# raises for bad input. Any other exception is a bug and keeps its traceback.
_REPORTED = (DsV4Error, OSError, ImportError, ValueError, RuntimeError)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each subcommand's."""
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 in PyTorch: train, run and study.")
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = {}
    for name, mod in _COMMANDS.items():
        p = sub.add_parser(name, help=mod.__doc__.strip().splitlines()[0], description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.add_argument("--debug", action="store_true", help="on an error, print its traceback (or DSV4_DEBUG=1)")
        parsers[name] = p
    return parser, parsers


def main(argv: list[str] | None = None) -> int:
    parser, parsers = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would report these with the top-level usage; the subcommand's is the useful one
        parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return _COMMANDS[args.command].run(args) or 0
    except KeyboardInterrupt:
        print(f"\ndsv4 {args.command}: interrupted", file=sys.stderr)
        return 130
    except _REPORTED as e:
        if args.debug or os.environ.get("DSV4_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"dsv4 {args.command}: error: {_describe(e)}", file=sys.stderr)
        return 2


def _describe(e: BaseException) -> str:
    """The message; for an exception that is not dsv4's own, its type too (it may come from deep inside)."""
    text = str(e) or type(e).__name__
    if isinstance(e, (DsV4Error, OSError, ImportError)):
        return text
    return f"{text} ({type(e).__name__}; DSV4_DEBUG=1 shows where it was raised)"
