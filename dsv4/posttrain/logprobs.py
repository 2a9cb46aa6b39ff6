"""Per-token log-probabilities (and entropies) of whole trajectories under a model, in one training forward.

The lanes come from one `model.hidden` pass; the head and the log-softmax run over sequence chunks, each under
activation checkpointing when gradients are on, so the fp32 [B, T, vocab] logits never exist whole (only one
chunk's, in the forward and again in the backward). `temperature` divides the logits as the sampler did, so the
values compare with the rollout's (which are log-probabilities of the tempered distribution it sampled from;
top-p / top-k truncation is not reproduced here: GRPO samples with both off).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .buckets import bucketed
from .trajectory import Trajectory

__all__ = ["token_logprobs", "pad_batch", "Batch"]


class Batch:
    """Trajectories right-padded into tensors [B, T]: tokens, policy mask, rollout log-probabilities. With a
    `bucket`, T - 1 (the tokens a training forward reads) is rounded up to a multiple of it (buckets.py)."""

    def __init__(self, trajectories: Sequence[Trajectory], device=None, pad_id: int = 0, bucket: int = 1):
        T = max(len(t.tokens) for t in trajectories)
        T = bucketed(T - 1, bucket) + 1 if T > 1 else T
        B = len(trajectories)
        self.tokens = torch.full((B, T), pad_id, dtype=torch.long)
        self.mask = torch.zeros(B, T, dtype=torch.bool)
        self.old_logp = torch.zeros(B, T, dtype=torch.float32)
        for b, t in enumerate(trajectories):
            n = len(t.tokens)
            self.tokens[b, :n] = torch.tensor(t.tokens)
            self.mask[b, :n] = torch.tensor(t.policy_mask, dtype=torch.bool)
            self.old_logp[b, :n] = torch.tensor(t.logprobs)
        if device is not None:
            self.tokens, self.mask, self.old_logp = (x.to(device) for x in (self.tokens, self.mask, self.old_logp))
        self.lengths = [len(t.tokens) for t in trajectories]


def pad_batch(trajectories: Sequence[Trajectory], device=None, pad_id: int = 0, bucket: int = 1) -> Batch:
    return Batch(trajectories, device, pad_id, bucket)


def _chunk_logprobs(model, h: torch.Tensor, targets: torch.Tensor, temperature: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lanes [B, S, R, C] predicting targets [B, S] -> (log p(target) [B, S], entropy [B, S]), fp32 (also when
    the forward runs under autocast: the log-softmax of low-precision logits would lose the small probabilities
    the ratio and the KL compare)."""
    logits = model.logits(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return picked, entropy


def token_logprobs(model, tokens: torch.Tensor, *, temperature: float = 1.0, chunk: int = 512
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, T] (on the model's device, or on the host: then the forward reads nothing back from the device)
    -> (logp [B, T], entropy [B, T]) on the model's device, where logp[:, t] = log p(tokens[t] | tokens[:t]) and
    entropy[:, t] is that distribution's entropy (in nats); position 0 (no context) is 0 in both. The entropy
    carries no gradient."""
    B, T = tokens.shape
    h = model.hidden(tokens[:, :-1]) if T > 1 else None   # ids on the host: checked there, sent without a wait
    device = model.embed.weight.device
    if tokens.device != device:   # the targets, beside the logits
        tokens = tokens.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tokens.to(device)
    logp = tokens.new_zeros((B, T), dtype=torch.float32)
    ent = torch.zeros(B, T, dtype=torch.float32, device=tokens.device)
    if h is None:
        return logp, ent
    parts, ents = [], []
    for s in range(0, T - 1, chunk):
        hc, tc = h[:, s:s + chunk], tokens[:, s + 1:s + 1 + chunk]
        if torch.is_grad_enabled():
            picked, e = checkpoint(_chunk_logprobs, model, hc, tc, temperature, use_reentrant=False)
        else:
            picked, e = _chunk_logprobs(model, hc, tc, temperature)
        parts.append(picked)
        ents.append(e.detach())
    logp = torch.cat([logp[:, :1], torch.cat(parts, 1)], 1)
    ent = torch.cat([ent[:, :1], torch.cat(ents, 1)], 1)
    return logp, ent
