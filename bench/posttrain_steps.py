"""Steps per second of the post-training pipeline's pre-training and SFT steps, eager and replayed as a CUDA graph.

Random documents stand in for the pipeline's (only their lengths matter to the speed): pre-training on stream
rows of --pretrain-batch x --pretrain-len tokens, packed SFT of --sft-batch rows of --sft-len tokens (about half
of each conversation trained). Each configuration trains a fresh model for --steps steps; the rate counts the
steps after the first (compilation, allocation, capture), from the metrics rows' `elapsed_s`.
  python bench/posttrain_steps.py                                  # the `mini` model on a GPU, < 60 s on an H100
  python bench/posttrain_steps.py --device cpu --model micro --pretrain-batch 4 --pretrain-len 128 \\
      --sft-batch 4 --sft-len 128 --steps 6                        # a CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsv4.model import Transformer  # noqa: E402
from dsv4.posttrain.chat_data import Example  # noqa: E402
from dsv4.posttrain.pipeline import model_config  # noqa: E402
from dsv4.posttrain.pretrain import train_pretrain  # noqa: E402
from dsv4.posttrain.sft import SFTConfig, train_sft  # noqa: E402


class _Tok:   # what training and save_policy read of a tokenizer (the bench writes no tokenizer file)
    bos_id, eos_id, vocab_size = None, 1, 1024

    class tok:
        @staticmethod
        def save(path: str) -> None:
            pass

        @staticmethod
        def id_to_token(i: int) -> str:
            return f"<{i}>"


def _docs(n: int, lo: int, hi: int, trained_from: float, rng: random.Random) -> list[Example]:
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        start = int(length * trained_from)
        out.append(Example([rng.randrange(2, 1024) for _ in range(length)], [0] * start + [1] * (length - start)))
    return out


def _rate(out: str) -> tuple[float, float]:
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    rows = [r for r in rows if "elapsed_s" in r]
    return (len(rows) - 1) / max(rows[-1]["elapsed_s"], 1e-9), rows[0]["warmup_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="mini")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--pretrain-batch", type=int, default=64)
    ap.add_argument("--pretrain-len", type=int, default=512)
    ap.add_argument("--sft-batch", type=int, default=32)
    ap.add_argument("--sft-len", type=int, default=512)
    ap.add_argument("--modes", default="eager,graph", help="eager (dynamic SFT shapes), static (SFT in fixed "
                    "shapes, eager), graph (fixed shapes, captured)")
    args = ap.parse_args()
    device = torch.device(args.device)
    rng = random.Random(0)
    pre = _docs(args.pretrain_batch * args.pretrain_len * (args.steps + 1) // 150 + 1, 40, 260, 0.0, rng)
    sft = _docs(args.sft_batch * (args.sft_len // 200 + 1) * (args.steps + 1), 60, min(args.sft_len, 400), 0.5, rng)
    print(f"{args.model} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"pretrain {args.pretrain_batch}x{args.pretrain_len}, packed SFT {args.sft_batch}x{args.sft_len}, "
          f"{args.steps} steps each", flush=True)
    for stage in ("pretrain", "sft"):
        for mode in args.modes.split(","):
            model = Transformer(model_config(args.model, 1024)).init_weights(seed=0).to(device).train()
            graph = {"eager": "off", "static": "off", "graph": "on"}[mode]
            if device.type != "cuda":
                graph = "off"
            big = stage == "pretrain"
            cfg = SFTConfig(steps=args.steps, lr=1e-3, batch_size=args.pretrain_batch if big else args.sft_batch,
                            seq_len=args.pretrain_len if big else args.sft_len, pack=True, device=str(device),
                            progress=False, cuda_graph=graph, static_shapes=mode != "eager")
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as out:
                if big:
                    train_pretrain(model, _Tok(), pre, cfg, out)
                else:
                    train_sft(model, _Tok(), sft, cfg, out)
                rate, warmup = _rate(out)
            print(f"{stage:9s} {mode:7s} {rate:7.2f} steps/s  ({1000 / rate:7.1f} ms/step; first step {warmup:5.1f} s; "
                  f"run {time.perf_counter() - t0:5.1f} s)", flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
