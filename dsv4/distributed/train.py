"""Training with context parallelism: each sequence split across `--cp` ranks (dsv4.distributed.context_parallel),
composed with FSDP2 over every rank, expert parallelism over every rank and data parallelism over groups of `--cp`
ranks. The loop, flags and metrics.jsonl are `dsv4 train`'s.

    torchrun --nproc_per_node 8 -m dsv4.distributed.train --cp 8 --preset small --seq-len 65536 --out runs/long
    torchrun --nproc_per_node 8 -m dsv4.distributed.train --cp 4 --batch-size 2 --out runs/cp4dp2   # 2 groups of 4
    torchrun --nproc_per_node 2 -m dsv4.distributed.train --cp 2 --contiguous ...   # chunk r on rank r, unbalanced

Ranks g*cp .. (g+1)*cp - 1 form context group g: they hold the same rows of the global batch (rows g, g + dp, ...)
and split their positions (balanced: rank r of the group holds chunks r and 2cp-1-r of 2cp). Every rank of a group
computes the group's whole loss (dsv4.train.losses sums over it), so FSDP's mean over all ranks is the mean over
the groups, as in data parallelism.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..config import ConfigError
from ..model import Transformer
from ..train.config import TrainConfig, resolve_config
from .context_parallel import ContextParallel
from .parallelize import init_distributed
from .placement import DistributedPlacement, check_config

__all__ = ["ContextParallelPlacement", "main"]


class ContextParallelPlacement(DistributedPlacement):
    """DistributedPlacement whose ranks split each sequence in groups of `cp`."""

    def __init__(self, mesh: DeviceMesh, cp: int, balanced: bool = True):
        super().__init__(mesh)
        if cp < 1 or self.world % cp:
            raise ConfigError(f"--cp {cp} does not divide the {self.world} ranks")
        self.cp, self.dp, self.balanced = cp, self.world // cp, balanced
        groups = [dist.new_group(list(range(g * cp, (g + 1) * cp))) for g in range(self.dp)]  # (every rank makes all)
        self.context = ContextParallel(groups[self.rank // cp], balanced=balanced)

    @classmethod
    def start(cls, cfg: TrainConfig, cp: int = 1, balanced: bool = True) -> "ContextParallelPlacement":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        check_cp_config(cfg, world, cp, balanced)
        return cls(init_distributed(), cp, balanced)

    def check(self, cfg: TrainConfig) -> None:
        check_cp_config(cfg, self.world, self.cp, self.balanced)

    def place(self, model: Transformer) -> Transformer:
        return super().place(model).set_sequence_context(self.context)

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[self.rank // self.cp::self.dp]

    def finish_grads(self, model: Transformer) -> None:
        """As DistributedPlacement, then drop gradients that are zero on every rank. In the indexer warm-up the
        context exchanges' order tokens carry the backward pass through every layer (dsv4.distributed.
        context_parallel._Ordered) and FSDP then leaves zeros where one process leaves None; an optimizer would step
        those zeros (momentum, decay), so they go."""
        super().finish_grads(model)
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return
        live = torch.stack([_local(p.grad).ne(0).any() for p in params]).float()
        dist.all_reduce(live, op=dist.ReduceOp.MAX)
        for p, keep in zip(params, live.tolist()):
            if not keep:
                p.grad = None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def check_cp_config(cfg: TrainConfig, world: int, cp: int, balanced: bool) -> None:
    if cp < 1 or world % cp:
        raise ConfigError(f"--cp {cp} does not divide the {world} ranks")
    check_config(cfg, world // cp)      # the batch divides among the data-parallel groups
    chunks = 2 * cp if balanced else cp
    if cfg.seq_len < chunks:
        raise ConfigError(f"seq_len={cfg.seq_len} is shorter than the {chunks} chunks of --cp {cp}"
                          f"{', balanced' if balanced else ''}")


def main(argv: list[str] | None = None) -> int:
    from ..train.trainer import train
    p = argparse.ArgumentParser(prog="torchrun -m dsv4.distributed.train", description=__doc__.split("\n")[0])
    p.add_argument("--cp", type=int, required=True, help="ranks that split each sequence")
    p.add_argument("--contiguous", action="store_true", help="chunk r on rank r (default: causally balanced)")
    p.add_argument("--config", help="a JSON file of training settings (flags override it)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest intact checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start a new run in a non-empty --out")
    p.add_argument("--skip-memory-check", action="store_true")
    for f in dataclasses.fields(TrainConfig):     # the flags of `dsv4 train`
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                       help=f"(default: {f.default})")
    args = p.parse_args(argv)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    cfg = resolve_config(resume=args.resume, config_file=args.config, overrides=flags)
    placement = ContextParallelPlacement.start(cfg, args.cp, balanced=not args.contiguous)
    logging.basicConfig(level=logging.INFO if placement.is_main else logging.WARNING, format="%(message)s")
    try:
        res = train(cfg, resume=args.resume, placement=placement, overwrite=args.overwrite,
                    check_memory=not args.skip_memory_check)
    finally:
        placement.close()
    if placement.is_main:
        print(f"\nfinished {res['steps']} steps: validation loss {res['first_val_loss']:.3f} -> {res['val_loss']:.3f}; "
              f"checkpoint {res['final_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
