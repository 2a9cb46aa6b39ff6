"""The training loop's Placement (dsv4.train.placement) for torchrun ranks: routed experts expert-parallel and
everything else FSDP2-sharded (`parallelize`), distributed Muon, each rank training its rows of the global
batch, and checkpoints in torch.distributed.checkpoint directories `OUT/dcp/step_NNNNNNN` that resume on any
number of ranks."""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..checkpoint import load_model
from ..config import ConfigError
from ..model import Transformer
from ..train.checkpointing import copy_tokenizer
from ..train.config import TrainConfig
from .checkpoint import export_official, load_distributed, save_distributed
from .muon import DistributedMuon
from .parallelize import finish_expert_grads, global_expert_loads, init_distributed, parallelize

__all__ = ["DistributedPlacement", "check_config"]

_STEP_DIR = re.compile(r"^step_(\d{7})$")


def check_config(cfg: TrainConfig, world: int) -> None:
    """Settings a distributed run cannot take. Distributed steps are not captured as CUDA graphs: 'auto' means
    eager here, and asking for graphs is an error rather than silently ignored."""
    if cfg.cuda_graph == "on":
        raise ConfigError("cuda_graph='on' is for single-process `dsv4 train`; distributed training runs eager "
                          "(use auto or off)")
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} (the global batch) is not divisible by the {world} ranks")


class DistributedPlacement:
    """The ranks of one process group (one device each: the GPU of LOCAL_RANK, or the CPU with gloo;
    TrainConfig.device is not used). `start` joins the group, `close` leaves it."""

    muon_cls = DistributedMuon
    captures_graphs = False
    autocasts = False             # FSDP's mixed-precision policy computes in bf16 on GPUs (see `place`)
    checkpoint_dirs = "dcp/step_*"

    def __init__(self, mesh: DeviceMesh):
        self.mesh = mesh
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = (torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda"
                       else torch.device("cpu"))

    @classmethod
    def start(cls, cfg: TrainConfig) -> "DistributedPlacement":
        """Check `cfg` against torchrun's world size, then join the process group torchrun describes."""
        check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        return cls(init_distributed())

    def close(self) -> None:
        """Leave the process group (the end of the process's distributed work)."""
        dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check(self, cfg: TrainConfig) -> None:
        check_config(cfg, self.world)

    @contextmanager
    def main_first(self) -> Iterator[None]:
        if not self.is_main:
            dist.barrier()
        yield
        if self.is_main:
            dist.barrier()

    def place(self, model: Transformer) -> Transformer:
        return parallelize(model, self.mesh, bf16=self.device.type == "cuda")

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[self.rank::self.world]

    def finish_grads(self, model: Transformer) -> None:
        finish_expert_grads(model, self.world)

    def reduce_loads(self, loads: list[torch.Tensor]) -> list[torch.Tensor]:
        return global_expert_loads(loads)

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if op not in ("sum", "mean", "max"):
            raise ValueError(f"op must be 'sum', 'mean' or 'max', got {op!r}")
        t = values.to(self.device)                  # NCCL reduces device tensors only
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return (t / self.world if op == "mean" else t).cpu()

    def barrier(self) -> None:
        dist.barrier()

    def latest(self, directory: str) -> str | None:
        """The newest complete DCP checkpoint (DCP writes `.metadata` last: a save cut short has none)."""
        root = os.path.join(directory, "dcp")
        if not os.path.isdir(root):
            return None
        done = sorted(d for d in os.listdir(root)
                      if _STEP_DIR.match(d) and os.path.isfile(os.path.join(root, d, ".metadata")))
        return os.path.join(root, done[-1]) if done else None

    def save(self, directory: str, model: Transformer, optimizers: list, state: dict, tokenizer_dir: str) -> str:
        path = os.path.join(directory, "dcp", f"step_{state['step']:07d}")
        save_distributed(path, model, optimizers, extra=state)
        return path

    def load(self, path: str, model: Transformer, optimizers: list) -> dict:
        return load_distributed(path, model, optimizers)

    def export(self, model: Transformer, path: str, tokenizer_dir: str) -> None:
        export_official(path, model, dtype=torch.float32)
        if self.is_main:
            copy_tokenizer(tokenizer_dir, path)
        dist.barrier()

    def whole_model(self, model: Transformer, exported: str) -> Transformer | None:
        """The exported model, loaded by the main rank alone (the sharded one runs only with every rank)."""
        return load_model(exported, device=self.device, dtype=torch.float32) if self.is_main else None
