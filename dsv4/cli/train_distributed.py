"""Train on several GPUs or nodes under torchrun: the flags of `dsv4 train`, on FSDP2 + expert parallelism.

    torchrun --nproc_per_node 8 -m dsv4.cli.train_distributed --preset small --steps 2000 --out runs/small8
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m dsv4.cli.train_distributed --preset small --out runs/small16
    torchrun --nproc_per_node 4 -m dsv4.cli.train_distributed --resume runs/small8   # any number of ranks

A module run by torchrun rather than a `dsv4` subcommand: a failing rank raises with its full traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch.distributed as dist

from ..distributed.train import train_distributed
from ..train.config import TrainConfig
from .train import add_arguments


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    if args.resume:
        given.setdefault("out", args.resume)
        with open(os.path.join(args.resume, "train_config.json")) as f:
            cfg = TrainConfig(**{**json.load(f), **given})
    else:
        cfg = TrainConfig(**given)
    os.makedirs(cfg.out, exist_ok=True)
    if not dist.is_initialized() and int(os.environ.get("RANK", 0)) == 0:
        cfg.save(cfg.out)
    train_distributed(cfg, resume=bool(args.resume))


if __name__ == "__main__":
    main()
