"""Train a V4-architecture model with the V4 recipe (Muon, MTP, indexer KL, aux-loss-free balancing).

    dsv4 train                                   # tiny preset on the Python stdlib sources, a few CPU minutes
    dsv4 train --preset small --data corpus/ --steps 2000 --out runs/small
    dsv4 train --resume runs/small               # continue exactly where the last checkpoint left off
    dsv4 train --optimizer adamw --out runs/adamw  # ablations: --attention dense, --residual none|hc, --qat fp4, --mtp 0
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os

from ..train.config import TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a JSON file of training settings (flags override it)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
        p.add_argument(flag, dest=f.name, type=kind, default=None, help=f"(default: {f.default})")


def run(args: argparse.Namespace) -> int:
    from ..train.trainer import train  # heavy imports only when training
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    if args.resume:
        saved = os.path.join(args.resume, "train_config.json")
        if not os.path.isfile(saved):
            raise FileNotFoundError(f"--resume {args.resume}: no train_config.json there")
        base = TrainConfig.from_file(saved).to_dict()
        base.update(given)
        base.setdefault("out", args.resume)
        base["out"] = given.get("out", args.resume)
        cfg = TrainConfig(**base)
    elif args.config:
        cfg = dataclasses.replace(TrainConfig.from_file(args.config), **given)
    else:
        cfg = TrainConfig(**given)
    res = train(cfg, resume=args.resume)
    print(f"\nfinished {res['steps']} steps ({res['params'] / 1e6:.2f}M parameters): validation loss "
          f"{res['first_val_loss']:.3f} -> {res['val_loss']:.3f}; checkpoint {res['final_dir']}; "
          f"curves {os.path.join(cfg.out, 'loss.png')}")
    if "sample" in res:
        print("\nsample continuation:\n" + res["sample"])
    with open(os.path.join(cfg.out, "result.json"), "w") as f:
        json.dump({k: v for k, v in res.items()}, f, indent=2)
    return 0
