"""Validation loss: next-token cross-entropy on fixed held-out batches."""
from __future__ import annotations

from typing import Callable, ContextManager

import torch
import torch.nn.functional as F

from ..model import Transformer
from .placement import Placement

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: Transformer, batches: list[torch.Tensor], placement: Placement,
             autocast: Callable[[], ContextManager]) -> float:
    """Each batch's mean over its tokens, averaged over the batches. Each rank scores its rows of every batch
    and the sums are reduced, so the value does not depend on the number of ranks."""
    model.eval()
    sums = torch.zeros(len(batches), 2, dtype=torch.float64)          # per batch: summed loss, scored tokens
    for i, batch in enumerate(batches):
        rows, real = _rows(batch, placement)                           # [b, T + 1], [b]
        rows = rows.to(placement.device)
        T = rows.shape[1] - 1
        ctx = model.sequence_context                                   # context parallelism: this rank's positions
        at = torch.arange(T, device=rows.device) if ctx is None else ctx.shard_positions(T, rows.device)
        with autocast():
            logits = model(rows[:, at])                                # [b, T or this rank's part, vocab]
        ce = F.cross_entropy(logits.flatten(0, 1), rows[:, at + 1].flatten(), reduction="none")
        sums[i, 0] = (ce.view(rows.shape[0], -1).double().sum(1).cpu() * real).sum()
        sums[i, 1] = real.sum() * at.numel()
    model.train()
    sums = placement.all_reduce(sums, "sum")
    return float((sums[:, 0] / sums[:, 1]).mean())


def _rows(batch: torch.Tensor, placement: Placement) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of `batch` and which of them count (1) or pad (0). Every rank runs the model on the same
    number of rows (its collectives need all ranks), so a batch whose rows do not divide among the ranks is
    padded with copies of its first row that are not scored."""
    pad = -batch.shape[0] % placement.world
    real = torch.ones(batch.shape[0] + pad, dtype=torch.float64)
    if pad:
        real[batch.shape[0]:] = 0
        batch = torch.cat([batch, batch[:1].expand(pad, -1)])
    return placement.rows(batch), placement.rows(real)
