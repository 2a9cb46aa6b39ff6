"""Whether a run can fit on this machine, answered before anything heavy is built (tokenizer training for a
129K vocabulary, the corpus, the model): the parameters are counted on the meta device, and a run whose
estimated memory exceeds the device's is refused with both numbers instead of growing until the OS kills it.

The estimate is kept below what runs measure, so a run it refuses does not fit: fp32 weights and gradients
plus the optimizer's fp32 moments (AdamW keeps two a parameter; Muon one a matrix element, so a Muon run counts
one for every parameter), and the activations one micro-batch keeps for its backward pass at a rate taken below
the measured one (the small preset at 16 x 512 tokens peaked at 24.3 GB on an H100; estimated: 16.2 GB)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..config import ConfigError, ModelConfig
from ..model import Transformer
from .config import TrainConfig

__all__ = ["MemoryEstimate", "count_params", "estimate_memory", "device_memory", "check_fits"]

_STATE_BYTES = {"adamw": 16, "muon": 12}  # per parameter: fp32 weight + gradient + the optimizer's moments
_BLOCK_BYTES = 32        # per token, residual-stream element (dim x hc_mult) and block: what backward keeps
_LOGIT_BYTES = 8         # per token, vocabulary entry and prediction head: fp32 logits and their gradient


@dataclass(frozen=True)
class MemoryEstimate:
    params: int          # trained parameters, MTP included
    states: int          # bytes on one rank: weights, gradients, optimizer moments
    activations: int     # bytes on one rank: one micro-batch's saved activations and logits

    @property
    def total(self) -> int:
        return self.states + self.activations


def count_params(mcfg: ModelConfig) -> tuple[int, int]:
    """(main model, MTP blocks) parameter counts, without allocating them."""
    with torch.device("meta"):
        model = Transformer(mcfg)
    mtp = sum(p.numel() for p in model.mtp.parameters())
    return sum(p.numel() for p in model.parameters()) - mtp, mtp


def estimate_memory(cfg: TrainConfig, world: int = 1) -> MemoryEstimate:
    """A lower bound of one rank's memory for the run `cfg` on `world` ranks (states sharded over them)."""
    mcfg = cfg.model()
    main, mtp = count_params(mcfg)
    params = main + mtp
    tokens = math.ceil(cfg.batch_size / world) * cfg.seq_len
    blocks = mcfg.n_layers + mcfg.n_mtp_layers
    stream = tokens * mcfg.dim * mcfg.hc_mult
    if cfg.activation_checkpointing == "block":  # each block's input, and one block recomputed at a time
        kept = stream * (4 * blocks + _BLOCK_BYTES)
    else:
        kept = stream * _BLOCK_BYTES * blocks
    logits = tokens * mcfg.vocab_size * _LOGIT_BYTES * (1 + mcfg.n_mtp_layers)
    return MemoryEstimate(params, math.ceil(params * _STATE_BYTES[cfg.optimizer] / world), kept + logits)


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory the device has in all (a GPU's total; the machine's RAM, or its container's limit, for
    the CPU); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if device.type != "cpu":
        return None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def check_fits(cfg: TrainConfig, device: torch.device, world: int = 1) -> MemoryEstimate:
    """Raise ConfigError when the run cannot fit on `device`; returns the estimate."""
    need = estimate_memory(cfg, world)
    have = device_memory(device)
    if have is not None and need.total > have:
        model = f"--model-config {cfg.model_config}" if cfg.model_config else f"--preset {cfg.preset}"
        ranks = f" per rank of {world}" if world > 1 else ""
        raise ConfigError(
            f"{model} needs at least {_size(need.total)} of memory to train{ranks} ({need.params / 1e9:.2f}B "
            f"parameters: {_size(need.states)} of fp32 weights, gradients and optimizer state, "
            f"{_size(need.activations)} of activations at batch {cfg.batch_size} x {cfg.seq_len} tokens), "
            f"but {'this machine' if device.type == 'cpu' else device} has {_size(have)}. Choose a smaller --preset, --batch-size or --seq-len, spread the "
            "run over more GPUs (torchrun), or pass --skip-memory-check to try anyway")
    return need


def _size(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e6:.2f} MB"
