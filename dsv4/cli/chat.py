"""Chat with a checkpoint in the official V4 chat format (one user message per line; empty line or EOF ends).

    dsv4 chat --checkpoint path/to/model
    dsv4 chat --checkpoint path/to/model --thinking --system "You are a helpful assistant."
"""
from __future__ import annotations

import argparse
import sys
import time

from .generate import add_model_arguments, load


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--thinking", action="store_true", help="thinking mode (<think> ... </think>)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-seq-len", type=int, default=32768, help="cache capacity of the conversation")


def run(args: argparse.Namespace) -> int:
    from ..generate.sampling import SamplingConfig
    from ..generate.session import ChatSession

    model, tok, _ = load(args)
    session = ChatSession(model, tok, thinking=args.thinking, system=args.system, max_seq_len=args.max_seq_len,
                          sampling=SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k),
                          seed=args.seed, kv_dtype=args.kv_dtype, index_dtype=args.index_dtype)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        print("dsv4> ", end="", flush=True)
        t0 = time.perf_counter()
        reply = session.send(line.rstrip("\n"), args.max_new_tokens, on_text=lambda s: print(s, end="", flush=True))
        print(f"\n[{time.perf_counter() - t0:.2f} s; reused {session.reused} cached prompt tokens]",
              file=sys.stderr)
        if reply.get("tool_calls"):
            print(f"[tool calls: {reply['tool_calls']}]", file=sys.stderr)
