"""Training objectives of the V4 recipe and the aux-loss-free expert balancing.

  * next-token cross-entropy;
  * MTP: depth k predicts token t+k+1 from the lanes at t and the embedding of token t+k (weight `mtp_weight`);
  * the lightning indexer's KL loss (each CSA layer's `indexer_kl`, averaged over layers);
  * a small sequence-wise balance loss (DeepSeek-V3 style): per sequence sum_e f_e * P_e, with f_e the
    expert's share of the sequence's selections (scaled so uniform = 1) and P_e its mean normalised affinity;
  * after each optimizer step, aux-loss-free balancing nudges each expert's selection bias by
    `speed * sign(mean load - load)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..model import Transformer
from ..model.attention import Attention
from ..model.moe import MoE


@dataclass(kw_only=True)
class LossWeights:
    mtp: float = 0.3
    indexer_kl: float = 1.0
    balance: float = 1e-4


def routed_layers(model: Transformer) -> list[MoE]:
    """MoE layers whose selection is learned (hash layers route by a fixed table)."""
    return [m for m in model.modules() if isinstance(m, MoE) and not m.gate.hashed]


def balance_loss(moe: MoE, batch: int, total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """total: sums over the holders of the sequences' other positions (context parallelism)."""
    idx, scores = moe.last_routing                                       # [B*S, k], [B*S, E]
    E, k = scores.shape[1], idx.shape[1]
    counts = torch.zeros(batch, idx.shape[0] // batch, E, device=idx.device)
    counts.scatter_add_(2, idx.view(batch, -1, k), torch.ones_like(idx, dtype=counts.dtype).view(batch, -1, k))
    selected = counts.sum(1)                                              # [B, E]
    affinity = (scores / scores.sum(-1, keepdim=True)).view(batch, -1, E).sum(1)  # [B, E]
    n = torch.full((), counts.shape[1], dtype=counts.dtype, device=counts.device)
    if total is not None:
        selected, affinity, n = total(selected), total(affinity), total(n)
    f = selected * E / (k * n)                                            # [B, E], 1 when uniform
    return (f * affinity / n).sum(-1).mean()


def lm_loss(model: Transformer, h: torch.Tensor, targets: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Mean next-token cross-entropy of the lanes h [B, T, R, C] against targets [B, T]. With activation
    checkpointing (long sequences) the head and loss run in checkpointed token chunks: the fp32 logits
    (T x vocab, 8.6 GB at 64K tokens and a 32K vocabulary) never exist whole."""
    if not model.recomputes or h.shape[1] <= chunk:
        return F.cross_entropy(model.logits(h).flatten(0, 1), targets.flatten())

    def part(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model.logits(hc).flatten(0, 1), tc.flatten(), reduction="sum")
    total = sum(checkpoint(part, h[:, s:s + chunk], targets[:, s:s + chunk], use_reentrant=False)
                for s in range(0, h.shape[1], chunk))
    return total / targets.numel()


def loss_terms(model: Transformer, tokens: torch.Tensor, weights: LossWeights, *, lm: bool = True
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """tokens: [B, T + 1 + n_mtp]. Returns the total loss and its detached parts, as tensors: no host sync, so a
    CUDA graph can capture it.

    lm=False is the indexer warm-up stage: only the indexer KL loss (whose gradient reaches only the indexer).
    Under context parallelism (model.sequence_context) this process runs its positions of the sequences and every
    term is the whole sequences' (summed over the holders of the other positions): the same on every holder."""
    n_mtp = len(model.mtp)
    T = tokens.shape[1] - 1 - n_mtp
    ctx = model.sequence_context
    at = torch.arange(T, device=tokens.device) if ctx is None else ctx.shard_positions(T, tokens.device)

    def shifted(k: int) -> torch.Tensor:                                   # tokens k after each position run
        return tokens[:, at + k]

    def mean(local_mean: torch.Tensor) -> torch.Tensor:    # weighted by the holders' positions (chunks may differ)
        if ctx is None:
            return local_mean
        n = torch.full_like(local_mean, len(at))
        return ctx.sum(local_mean * n) / ctx.sum(n)
    inputs = shifted(0)
    h = model.hidden(inputs)  # (which drops the previous step's routing records first)
    parts: dict[str, torch.Tensor] = {}
    total = tokens.new_zeros((), dtype=torch.float32)
    if lm:
        ce = mean(lm_loss(model, h, shifted(1)))
        parts["lm"] = ce.detach()
        total = total + ce
        if n_mtp and weights.mtp:
            mtp = [mean(F.cross_entropy(lg.flatten(0, 1), shifted(k + 2).flatten()))
                   for k, lg in enumerate(model.mtp_logits(h, [shifted(k + 1) for k in range(n_mtp)]))]
            mtp_loss = torch.stack(mtp).mean()
            parts["mtp"] = mtp_loss.detach()
            total = total + weights.mtp * mtp_loss
        moes = [m for m in routed_layers(model) if m.last_routing is not None]
        if moes and weights.balance:
            over = None if ctx is None else ctx.sum
            bal = torch.stack([balance_loss(m, tokens.shape[0], over) for m in moes]).mean()
            parts["balance"] = bal.detach()
            total = total + weights.balance * bal
    kls = [a.indexer_kl for a in model.modules() if isinstance(a, Attention) and a.indexer_kl is not None]
    if kls:
        kl = torch.stack(kls).mean()
        parts["indexer_kl"] = kl.detach()
        total = total + weights.indexer_kl * kl
    parts["loss"] = total.detach()
    return total, parts


def compute_loss(model: Transformer, tokens: torch.Tensor, weights: LossWeights, *, lm: bool = True
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """loss_terms with the parts as floats (for logging)."""
    total, parts = loss_terms(model, tokens, weights, lm=lm)
    return total, {k: float(v) for k, v in parts.items()}


@torch.no_grad()
def expert_loads(model: Transformer) -> list[torch.Tensor]:
    """Tokens routed to each expert in the last forward pass, per learned-routing MoE layer."""
    loads = []
    for m in routed_layers(model):
        load = torch.zeros(m.gate.weight.shape[0], device=m.gate.weight.device)
        if m.last_routing is not None:  # a scatter, not bincount: bincount syncs with the host to size its output
            idx = m.last_routing[0].flatten()
            load.scatter_add_(0, idx, torch.ones_like(idx, dtype=load.dtype))
        loads.append(load)
    return loads


@torch.no_grad()
def expert_bias_step(model: Transformer, loads: list[torch.Tensor], speed: float) -> torch.Tensor:
    """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones; a layer that routed
    nothing keeps its bias. No host sync (the step may run ahead of the GPU): returns, as a device scalar, the mean
    max/mean load ratio over the layers that routed tokens (1 = perfectly balanced; 0 when none did)."""
    ratios, used = [], []
    for moe, load in zip(routed_layers(model), loads):
        routed = load.sum() > 0
        nudge = speed * torch.sign(load.mean() - load)
        moe.gate.bias.add_(torch.where(routed, nudge, torch.zeros_like(nudge)).to(moe.gate.bias.device))
        ratios.append(torch.where(routed, load.max() / load.mean().clamp(min=1e-9), torch.zeros_like(nudge[0])))
        used.append(routed)
    if not ratios:
        return torch.zeros(())
    return torch.stack(ratios).sum() / torch.stack(used).sum().clamp(min=1)


def update_expert_bias(model: Transformer, loads: list[torch.Tensor], speed: float) -> float:
    """expert_bias_step with its load ratio read on the host, for logging."""
    return float(expert_bias_step(model, loads, speed))
