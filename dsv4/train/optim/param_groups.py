"""Which parameters Muon trains and which AdamW trains (V4 §2.4, §4.2.2; docs/training-recipe.md#muon-or-adamw).

The rule, by parameter name of `dsv4.Transformer` (official checkpoint naming):

- AdamW: the embedding and the LM head (`embed.weight`, `head.weight`), every parameter with fewer
  than 2 dims (RMSNorm weights, mHC static biases `hc_*_base` and gates `hc_*_scale`, attention
  sinks), and the compressors' `ape`: 2-D, but a position bias added to scores, not a linear map.
- Muon: every other 2-D/3-D matrix: attention, compressor and indexer projections, the router gate
  weight, shared experts, routed experts (`experts.w1` [E, F, C] = E independent matrices), the mHC
  dynamic projections `hc_*_fn` (one fused matrix each, as stored: [(2+n)n, n*d], [n, n*d] for
  `hc_head_fn`), MTP projections.
  `attn.wo_a` is orthogonalised per head group ([G*r, d] = G independent [r, d] blocks): each block
  maps only its own group's head outputs, so the layer's linear map is block-diagonal in them.
- requires_grad=False parameters (the aux-loss-free router bias `ffn.gate.bias`, updated outside
  the optimiser) are in no group.

Weight decay (decoupled, default 0.1) is our choice where V4 is silent: it applies to matrices (all
Muon matrices, the embedding and the head) and not to gains, biases, gates and sinks (norms,
`hc_*_base`, `hc_*_scale`, `attn_sink`, `ape`), whose pull towards 0 does not regularise anything.
AdamW uses eps 1e-8 by default (torch's); V4 uses 1e-20, pass eps=1e-20 to follow it.
optimizer="adamw" is the ablation baseline: everything in AdamW, with the same decay split.
Both optimisers share one learning rate (Muon's update-RMS matching makes that work); the trainer
sets `group["lr"]` of every group of every returned optimiser each step.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ...model.attention import Attention
from .muon import Muon


def _adamw_only(name: str, p: torch.Tensor) -> bool:
    owner, leaf = (["", *name.split(".")])[-2:]
    return p.ndim < 2 or leaf == "ape" or (leaf == "weight" and owner in ("embed", "head"))


def _decayed(name: str, p: torch.Tensor) -> bool:
    return p.ndim >= 2 and not name.endswith(".ape")


def _trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def split_params(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(Muon parameters, AdamW parameters) of the trainable parameters, by the module docstring's rule."""
    muon, adamw = [], []
    for name, p in _trainable(model):
        (adamw if _adamw_only(name, p) else muon).append(p)
    return muon, adamw


def _muon_groups(model: nn.Module, muon: list[torch.Tensor]) -> list[dict]:
    """One group of whole matrices, plus one per wo_a block shape (orthogonalised per head group)."""
    blocks = {id(m.wo_a.weight): (m.o_lora_rank, m.wo_a.in_features)
              for m in model.modules() if isinstance(m, Attention)}
    whole, grouped = [], defaultdict(list)
    for p in muon:
        if id(p) in blocks:
            grouped[blocks[id(p)]].append(p)
        else:
            whole.append(p)
    groups = [{"params": whole}] + [{"params": ps, "matrix_shape": shape} for shape, ps in grouped.items()]
    return [g for g in groups if g["params"]]


def build_optimizers(model: nn.Module, lr: float, *, optimizer: str = "muon", weight_decay: float = 0.1,
                     update_rms: float = 0.18, momentum: float = 0.95,
                     betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                     ns_dtype: torch.dtype | None = None, muon_cls: type = Muon) -> list[torch.optim.Optimizer]:
    """[Muon, AdamW] (optimizer="muon") or [AdamW] (optimizer="adamw") over the trainable parameters.
    `muon_cls`: dsv4.distributed.DistributedMuon for FSDP-sharded models."""
    if optimizer not in ("muon", "adamw"):
        raise ValueError(f"optimizer must be 'muon' or 'adamw', got {optimizer!r}")
    muon = split_params(model)[0] if optimizer == "muon" else []
    muon_ids = {id(p) for p in muon}
    decay, no_decay = [], []
    for name, p in _trainable(model):
        if id(p) not in muon_ids:
            (decay if _decayed(name, p) else no_decay).append(p)
    adamw_groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
    opts: list[torch.optim.Optimizer] = []
    if muon:
        opts.append(muon_cls(_muon_groups(model, muon), lr, momentum=momentum,
                         weight_decay=weight_decay, update_rms=update_rms, ns_dtype=ns_dtype))
    if adamw_groups:
        opts.append(torch.optim.AdamW(adamw_groups, lr, betas=betas, eps=eps))
    return opts
