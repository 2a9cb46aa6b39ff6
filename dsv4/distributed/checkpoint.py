"""Distributed checkpoints with torch.distributed.checkpoint: sharded save, load on any number of ranks
(FSDP shards, expert shards and optimizer state are DTensors, which DCP reshards), and export to the
official single-directory format."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from ..checkpoint import save_model
from ..model import Transformer


def save_distributed(path: str, model: Transformer, optimizers: list, extra: dict | None = None) -> None:
    """A DCP checkpoint of the model, its optimizers and `extra` (nested dicts of plain values, string keys
    without dots)."""
    msd, osd = get_state_dict(model, optimizers)
    dcp.save({"model": msd, "optim": osd, "extra": extra or {}}, checkpoint_id=path)


def load_distributed(path: str, model: Transformer, optimizers: list) -> dict:
    """Load into an already parallelized model and its optimizers (any world size); returns `extra`.

    Parameters that had no optimizer state when saved (never had a gradient, e.g. the indexer outside its
    training stages) get none now either, exactly as in the run that saved."""
    msd, osd = get_state_dict(model, optimizers)
    saved = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    for fqn in list(osd.get("state", {})):
        entry = osd["state"][fqn]
        for key in [k for k in entry if f"optim.state.{fqn}.{k}" not in saved]:
            del entry[key]
        if not entry:
            del osd["state"][fqn]
    extra: dict = {}                                   # DCP fills the keys that exist: rebuild them, nested
    for key in saved:
        if key.startswith("extra."):
            *parents, leaf = key.split(".")[1:]
            node = extra
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = None
    state = {"model": msd, "optim": osd, "extra": extra}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))  # (state may be absent for gradient-free params)
    return state["extra"]


def full_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Every parameter and buffer gathered to full tensors on the CPU of rank 0 (empty elsewhere)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_official(path: str, model: Transformer, dtype: torch.dtype = torch.bfloat16) -> None:
    """Gather a parallelized model and write the official checkpoint directory from rank 0."""
    sd = full_state_dict(model)
    if dist.get_rank() == 0:
        plain = Transformer(model.config)
        missing, unexpected = plain.load_state_dict(sd, strict=False)
        if unexpected or [m for m in missing if not m.endswith("freqs")]:
            raise RuntimeError(f"gathered state does not match the model: missing {missing}, unexpected {unexpected}")
        os.makedirs(path, exist_ok=True)
        save_model(plain, path, dtype=dtype)
    dist.barrier()
