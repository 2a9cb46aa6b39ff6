"""GRPO's objective as pure functions of per-token tensors, so each choice can be checked by hand.

  * advantages: each sample's reward against its group (the G samples of one prompt): (r - mean) / (std + eps)
    with the unbiased std; Dr. GRPO drops the std division (it up-weights groups whose rewards barely differ);
  * surrogate: PPO's clipped importance ratio, ratio = exp(logp - old_logp) clipped to [1 - eps, 1 + eps_high]
    (eps_high = eps unless set: DAPO's asymmetric "clip higher");
  * KL to a frozen reference: the unbiased k3 estimator exp(ref - logp) - (ref - logp) - 1 (>= 0, exact in
    expectation over samples of the policy);
  * aggregation over the policy tokens of a minibatch: "token" (sum / number of tokens: every token weighs the
    same), "sequence" (each sequence's mean, then the mean over sequences: the original GRPO's), or
    "constant" (Dr. GRPO: sum / (sequences * max_new_tokens), a normaliser that does not depend on lengths,
    so long wrong answers are not favoured over short ones).

`loss_type="grpo"` is token aggregation with std-scaled advantages; `"dr_grpo"` constant aggregation without.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidArgument

__all__ = ["GRPOLossConfig", "group_advantages", "clipped_surrogate", "k3_kl", "aggregate", "grpo_loss",
           "AGGREGATIONS", "LOSS_TYPES"]

AGGREGATIONS = ("token", "sequence", "constant")
LOSS_TYPES = ("grpo", "dr_grpo")


@dataclass(kw_only=True)
class GRPOLossConfig:
    epsilon: float = 0.2
    epsilon_high: float | None = None   # None: the same as epsilon
    beta: float = 0.0                   # weight of the k3 KL to the reference model (0: no reference needed)
    aggregation: str = "token"
    scale_rewards: bool = True          # divide advantages by the group's std
    max_len: int | None = None          # the constant normaliser's length (max_new_tokens); "constant" needs it
    adv_eps: float = 1e-4

    def __post_init__(self) -> None:
        if not self.epsilon > 0 or (self.epsilon_high is not None and not self.epsilon_high > 0):
            raise InvalidArgument(f"epsilon={self.epsilon}, epsilon_high={self.epsilon_high}: must be > 0")
        if not self.beta >= 0:
            raise InvalidArgument(f"beta={self.beta}: must be >= 0")
        if self.aggregation not in AGGREGATIONS:
            raise InvalidArgument(f"aggregation={self.aggregation!r}: must be one of {AGGREGATIONS}")
        if self.aggregation == "constant" and (self.max_len is None or self.max_len < 1):
            raise InvalidArgument(f"aggregation='constant' needs max_len >= 1 (max_new_tokens), got {self.max_len}")

    @classmethod
    def for_loss_type(cls, loss_type: str, **kw) -> "GRPOLossConfig":
        """The settings a named variant stands for; `kw` (epsilon, beta, max_len, ...) fills the rest."""
        if loss_type not in LOSS_TYPES:
            raise InvalidArgument(f"loss_type={loss_type!r}: must be one of {LOSS_TYPES}")
        if loss_type == "dr_grpo":
            return cls(aggregation="constant", scale_rewards=False, **kw)
        return cls(aggregation="token", scale_rewards=True, **kw)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4
                     ) -> torch.Tensor:
    """rewards [N] (N = prompts * group_size, each prompt's samples consecutive) -> advantages [N]."""
    if group_size < 1 or rewards.numel() % group_size:
        raise InvalidArgument(f"{rewards.numel()} rewards do not split into groups of group_size={group_size}")
    r = rewards.view(-1, group_size)
    adv = r - r.mean(-1, keepdim=True)
    if scale:
        std = r.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        adv = adv / (std + eps)
    return adv.flatten()


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, epsilon: float,
                      epsilon_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss -min(ratio * A, clip(ratio) * A) and where the clip bound (it has zero gradient there).
    logp/old_logp [B, T], adv [B] or [B, T]."""
    hi = epsilon if epsilon_high is None else epsilon_high
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - epsilon, 1 + hi) * adv
    bound = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + hi) & (adv > 0))
    return -torch.minimum(unclipped, clipped), bound


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token unbiased estimate of KL(policy || reference) from the sampled token's two log-probabilities."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, max_len: int | None = None) -> torch.Tensor:
    """One scalar from per-token values [B, T] over mask [B, T] (1 = a policy token); see the module doc."""
    m = mask.to(per_token.dtype)
    total = (per_token * m).sum()
    if how == "token":
        return total / m.sum().clamp(min=1)
    if how == "sequence":
        per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1)
        return per_seq.mean()
    if how == "constant":
        if max_len is None:
            raise InvalidArgument("aggregate how='constant' needs max_len")
        return total / (per_token.shape[0] * max_len)
    raise InvalidArgument(f"aggregate how={how!r}: must be one of {AGGREGATIONS}")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              cfg: GRPOLossConfig, ref_logp: torch.Tensor | None = None, *, tensors: bool = False
              ) -> tuple[torch.Tensor, dict]:
    """The minibatch loss and its detached parts (kl, clip_frac, ratio): Python floats, or with `tensors` the
    0-dim device tensors they are read from (a training loop that reads its logged values once per batch keeps
    them on the device: each read waits for the GPU)."""
    surrogate, bound = clipped_surrogate(logp, old_logp, adv, cfg.epsilon, cfg.epsilon_high)
    per_token = surrogate
    stats: dict[str, torch.Tensor] = {}
    m = mask.bool()
    n = m.sum().clamp(min=1)
    if cfg.beta > 0 or ref_logp is not None:
        if ref_logp is None:
            raise InvalidArgument(f"beta={cfg.beta} > 0 needs the reference model's log-probabilities")
        kl = k3_kl(logp, ref_logp)
        if cfg.beta > 0:
            per_token = per_token + cfg.beta * kl
        stats["kl"] = (kl.detach() * m).sum() / n
    stats["clip_frac"] = (bound & m).sum() / n
    stats["ratio"] = (torch.exp(logp - old_logp).detach() * m).sum() / n
    loss = aggregate(per_token, mask, cfg.aggregation, cfg.max_len)
    if tensors:
        return loss, stats
    return loss, {k: float(v) for k, v in stats.items()}
