"""Supervised fine-tuning on chat conversations (loss on the assistant's tokens only).

    dsv4 sft --model runs/base/final --data chats.jsonl --out runs/sft
    dsv4 sft --model DIR --data chats.jsonl --out DIR --epochs 3 --lr 1e-4 --seq-len 2048 --no-pack
    dsv4 sft --model DIR --data chats.jsonl --out DIR --thinking   # render conversations in thinking mode

Each line of the data is one conversation in the OpenAI format: {"messages": [...], "tools": [...],
"thinking": true|false}, with assistant `reasoning_content` and `tool_calls`, and `tool` messages for the
results. It is rendered in the official V4 chat encoding. Output: OUT/metrics.jsonl, OUT/loss.png and
OUT/final/ (the official checkpoint format with the tokenizer: `dsv4 chat OUT/final` talks to it).
"""
from __future__ import annotations

import argparse
import json
import logging
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="the base checkpoint (with its tokenizer)")
    p.add_argument("--data", required=True, metavar="FILE", help="a .jsonl file of conversations")
    p.add_argument("--out", required=True, metavar="DIR", help="where the metrics, plot and final/ go")
    p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs passes over the data)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the data when --steps is not given (default 1)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step (default 8)")
    p.add_argument("--seq-len", type=int, default=512,
                   help="tokens per row; longer conversations are cut (default 512)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="pack several conversations into a row, each attending only to itself (default: on)")
    p.add_argument("--thinking", action="store_true",
                   help="render conversations in thinking mode unless a line says \"thinking\": false")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps (default 5)")
    p.add_argument("--optimizer", choices=("muon", "adamw"), default="muon",
                   help="muon: Muon for matrices + AdamW for the rest, as V4 (default); adamw: AdamW for all")
    p.add_argument("--mtp-weight", type=float, default=0.3, help="weight of the MTP loss (default 0.3)")
    p.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's results in --out")


def run(args: argparse.Namespace) -> int:
    from ..posttrain.sft import SFTConfig, sft  # heavy imports only when training
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = SFTConfig(steps=args.steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                    seq_len=args.seq_len, pack=args.pack, thinking=args.thinking, warmup=args.warmup,
                    optimizer=args.optimizer, mtp_weight=args.mtp_weight, device=args.device, seed=args.seed)
    res = sft(args.model, args.data, args.out, cfg, overwrite=args.overwrite)
    print(f"\nfinished {res['steps']} SFT steps: loss on the assistant's tokens {res['first_loss']:.3f} -> "
          f"{res['last_loss']:.3f}; checkpoint {res['final_dir']}; curve {os.path.join(args.out, 'loss.png')}")
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(res, f, indent=2)
    return 0
