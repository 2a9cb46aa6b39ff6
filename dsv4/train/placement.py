"""Where a training run's work happens: the seam between the loop (dsv4.train.trainer, written once) and
parallelism, which is applied to the built model from outside.

A Placement answers everything that differs between one process and several: which rank this is, where the
model lives, which rows of the global batch this rank trains, how gradients are finished and values reduced
over ranks, and how checkpoints are written and read. `SingleProcess` is the one-process case (official-format
checkpoint directories + train_state.pt); `dsv4.distributed.DistributedPlacement` is the torchrun case
(FSDP2 + expert parallelism, reshardable torch.distributed.checkpoint directories)."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import torch

from ..checkpoint import CheckpointError, resolve_device
from ..model import Transformer
from .checkpointing import export, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .optim import Muon

__all__ = ["Placement", "SingleProcess", "device_for"]


class Placement(Protocol):
    rank: int
    world: int
    device: torch.device
    muon_cls: type[Muon]          # the Muon that steps this placement's parameters
    captures_graphs: bool         # whether a step may run as a captured CUDA graph
    autocasts: bool               # whether forward passes on CUDA run under bf16 autocast
    checkpoint_dirs: str          # where checkpoints live in a run directory, for messages

    @property
    def is_main(self) -> bool:
        """The rank that writes the run's files (metrics, plot, config) and shows progress."""

    def check(self, cfg: TrainConfig) -> None:
        """Raise ConfigError for settings this placement cannot run."""

    def main_first(self) -> AbstractContextManager:
        """A block the main rank runs first and the others after it (preparing data the others then read)."""

    def place(self, model: Transformer) -> Transformer:
        """The built model (on `device`) placed for training."""

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch [B, ...]."""

    def finish_grads(self, model: Transformer) -> None:
        """Make every gradient that of the mean loss over the global batch (after the backward passes)."""

    def reduce_loads(self, loads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-layer expert loads summed over ranks: every rank then nudges the biases identically."""

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`values` (a CPU tensor) combined over ranks by op 'sum', 'mean' or 'max'; a CPU tensor."""

    def barrier(self) -> None: ...

    def latest(self, directory: str) -> str | None:
        """The newest checkpoint of the run in `directory` (None if it has none)."""

    def save(self, directory: str, model: Transformer, optimizers: list, state: dict, tokenizer_dir: str) -> str:
        """Write a checkpoint of the run in `directory` at `state["step"]`; returns its path."""

    def load(self, path: str, model: Transformer, optimizers: list) -> dict:
        """Restore a checkpoint into the placed model and its optimizers; returns the saved `state`."""

    def export(self, model: Transformer, path: str, tokenizer_dir: str) -> None:
        """The official single-directory format (fp32) + tokenizer files, loadable by dsv4.load_model."""

    def whole_model(self, model: Transformer, exported: str) -> Transformer | None:
        """The trained model whole in this process, for sampling (None on ranks that do not sample)."""


def device_for(choice: str) -> torch.device:
    """TrainConfig.device: 'auto' is the GPU when there is one."""
    return resolve_device(choice)


class SingleProcess:
    """One process on one device: the model as built, the whole batch, nothing to reduce."""

    rank, world = 0, 1
    muon_cls = Muon
    captures_graphs = True
    autocasts = True
    checkpoint_dirs = "checkpoints/step_*"

    def __init__(self, device: torch.device | str = "auto"):
        self.device = device_for(device) if isinstance(device, str) else device

    @property
    def is_main(self) -> bool:
        return True

    def check(self, cfg: TrainConfig) -> None:
        pass

    def main_first(self) -> AbstractContextManager:
        return nullcontext()

    def place(self, model: Transformer) -> Transformer:
        return model

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def finish_grads(self, model: Transformer) -> None:
        pass

    def reduce_loads(self, loads: list[torch.Tensor]) -> list[torch.Tensor]:
        return loads

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return values

    def barrier(self) -> None:
        pass

    def latest(self, directory: str) -> str | None:
        return latest_checkpoint(directory)

    def save(self, directory: str, model: Transformer, optimizers: list, state: dict, tokenizer_dir: str) -> str:
        return save_checkpoint(directory, model, tokenizer_dir,
                               {**state, "optimizers": [o.state_dict() for o in optimizers]})

    def load(self, path: str, model: Transformer, optimizers: list) -> dict:
        state = load_checkpoint(path, model)
        saved = state.get("optimizers")
        if not isinstance(saved, list) or len(saved) != len(optimizers):
            raise CheckpointError(f"{path}: its training state holds no state for this run's "
                                  f"{len(optimizers)} optimizer(s)")
        for o, s in zip(optimizers, saved):
            o.load_state_dict(s)
        return state

    def export(self, model: Transformer, path: str, tokenizer_dir: str) -> None:
        export(model, path, tokenizer_dir, dtype=torch.float32)

    def whole_model(self, model: Transformer, exported: str) -> Transformer | None:
        return model
