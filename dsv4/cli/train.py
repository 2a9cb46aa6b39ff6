"""Train a V4-architecture model with the V4 recipe (Muon, MTP, indexer KL, aux-loss-free balancing).

    dsv4 train                                   # tiny preset on the Python stdlib sources, a few CPU minutes
    dsv4 train --preset small --data corpus/ --steps 2000 --out runs/small
    dsv4 train --resume runs/small               # continue exactly where the last checkpoint left off
    dsv4 train --out runs/small --overwrite      # a new run in place of the one there (else refused)
    dsv4 train --optimizer adamw --out runs/adamw  # ablations: --attention dense, --residual none|hc, --qat fp4, --mtp 0
    dsv4 train --config run.json --steps 500     # settings from a JSON file; flags override it

Several GPUs or nodes: the same command under torchrun trains with FSDP2 + expert parallelism.

    torchrun --nproc_per_node 8 -m dsv4 train --preset small --batch-size 64 --out runs/small8
    torchrun --nproc_per_node 4 -m dsv4 train --resume runs/small8     # on any number of ranks
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m dsv4 train --preset small --batch-size 128 --out runs/small16

A run is distributed when torchrun launched it (its environment sets RANK and WORLD_SIZE), with one process
too: its checkpoints are then torch.distributed.checkpoint directories (OUT/dcp/step_NNNNNNN, resumable on
any number of ranks) instead of OUT/checkpoints/step_NNNNNNN. `--batch-size` is the global batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os

from ..train.config import TrainConfig, resolve_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a JSON file of training settings (flags override it)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest intact checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a non-empty --out, removing the previous run's checkpoints and results")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="train even where the estimated memory exceeds the device's")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        p.add_argument(flag, dest=f.name, type=kind, default=None, help=f"(default: {f.default})")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run(args: argparse.Namespace) -> int:
    from ..train.trainer import train  # heavy imports only when training
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    cfg = resolve_config(resume=args.resume, config_file=args.config, overrides=flags)
    placement = None
    if launched_by_torchrun():
        from ..distributed import DistributedPlacement
        placement = DistributedPlacement.start(cfg)
    main = placement is None or placement.is_main
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(message)s")
    try:
        res = train(cfg, resume=args.resume, placement=placement, overwrite=args.overwrite,
                    check_memory=not args.skip_memory_check)
    finally:
        if placement is not None:
            placement.close()
    if not main:
        return 0
    mtp = f", {(res['params'] + res['mtp_params']) / 1e6:.2f}M with MTP" if res["mtp_params"] else ""
    print(f"\nfinished {res['steps']} steps ({res['params'] / 1e6:.2f}M parameters{mtp}): validation loss "
          f"{res['first_val_loss']:.3f} -> {res['val_loss']:.3f}; checkpoint {res['final_dir']}; "
          f"curves {os.path.join(cfg.out, 'loss.png')}")
    if "sample" in res:
        print("\nsample continuation:\n" + res["sample"])
    with open(os.path.join(cfg.out, "result.json"), "w") as f:
        json.dump(res, f, indent=2)
    return 0
