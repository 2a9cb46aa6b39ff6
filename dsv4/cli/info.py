"""Parameter counts (total / activated, per layer type) of a preset or checkpoint; with --train-memory, the
predicted peak memory of a training step and the longest trainable context (dsv4/train/memory.py).

    dsv4 info --preset flash
    dsv4 info --checkpoint path/to/model --json
    dsv4 info --preset small --train-memory --seq-len 1048576 --gpus 8 --gpu-gb 141
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
    mem = p.add_argument_group("training memory (--train-memory)")
    mem.add_argument("--train-memory", action="store_true",
                     help="predict one training step's peak memory per GPU (block recompute, chunked loss) instead")
    mem.add_argument("--seq-len", type=int, default=1 << 20, help="tokens of the sequence (default 1M)")
    mem.add_argument("--gpus", type=int, default=1, help="context-parallel ranks sharing it (and FSDP shards)")
    mem.add_argument("--gpu-gb", type=float, default=141.0, help="memory per GPU in GB (default 141: H200)")
    mem.add_argument("--optimizer", default="muon", choices=["muon", "adamw", "none"])
    mem.add_argument("--param-bytes", type=int, default=4, choices=[2, 4],
                     help="bytes per stored parameter and gradient (4: fp32 master weights; 2: a bf16 model)")
    mem.add_argument("--fused-topk", action="store_true",
                     help="model an indexer top-k that never materialises queries x entries scores")


def run(args: argparse.Namespace) -> int:
    from ..info import format_report, param_report

    cfg = ModelConfig.preset(args.preset) if args.preset else ModelConfig.from_pretrained(args.checkpoint)
    if args.train_memory:
        return _train_memory(args, cfg)
    rep = param_report(cfg)
    if args.json:
        print(json.dumps(rep))
    else:
        print(format_report(args.preset or args.checkpoint, rep))
    return 0


def _train_memory(args: argparse.Namespace, cfg: ModelConfig) -> int:
    from ..errors import InvalidArgument
    from ..train.memory import longest_context, step_memory

    if args.seq_len <= 0 or args.gpus <= 0 or not args.gpu_gb > 0:
        raise InvalidArgument(f"--seq-len, --gpus and --gpu-gb must be positive, got {args.seq_len}, {args.gpus}, "
                              f"{args.gpu_gb}")
    kw = dict(param_bytes=args.param_bytes, optimizer=None if args.optimizer == "none" else args.optimizer,
              fused_topk=args.fused_topk)
    mem = step_memory(cfg, args.seq_len, cp=args.gpus, **kw)
    longest = longest_context(cfg, args.gpus, args.gpu_gb * 1e9, **kw)
    if args.json:
        print(json.dumps({"seq_len": args.seq_len, "gpus": args.gpus, "peak_bytes": mem.total, "phase": mem.phase,
                          "parts": mem.parts, "gpu_bytes": args.gpu_gb * 1e9, "fits": mem.total <= args.gpu_gb * 1e9,
                          "longest_context": longest}))
        return 0
    name = args.preset or args.checkpoint
    print(f"{name}: one training step of {args.seq_len:,} tokens on {args.gpus} GPU(s) (context parallel, FSDP), "
          f"block recompute, chunked loss, optimizer {args.optimizer}")
    for part, b in mem.parts.items():
        print(f"  {part:<18}{b / 1e9:>10.1f} GB")
    fits = "fits" if mem.total <= args.gpu_gb * 1e9 else "does not fit"
    print(f"  {'peak per GPU':<18}{mem.total / 1e9:>10.1f} GB  ({mem.phase}; {fits} in {args.gpu_gb:g} GB)")
    print(f"longest trainable context on {args.gpus} x {args.gpu_gb:g} GB: {longest:,} tokens")
    return 0
