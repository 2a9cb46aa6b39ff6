"""One training step's forward + backward on a micro-batch, eager or captured once as a CUDA graph per stage."""
from __future__ import annotations

import logging
from typing import Callable, ContextManager

import torch

from ..model import Transformer
from .cuda_graph import GraphedLoss
from .losses import LossWeights, expert_loads, loss_terms

log = logging.getLogger(__name__)

__all__ = ["step_outputs", "capture_step"]


def step_outputs(model: Transformer, batch: torch.Tensor, weights: LossWeights, stage: str, grad_accum: int,
                 autocast: Callable[[], ContextManager]) -> dict:
    """One micro-batch's forward, without host syncs (a CUDA graph may capture it): the loss to differentiate
    (scaled for accumulation), its parts ("part:<name>"), the expert loads and the recorded mHC comb matrices."""
    with autocast():
        total, parts = loss_terms(model, batch, weights, lm=stage != "indexer")
    return {"loss": total / grad_accum, **{"part:" + k: v for k, v in parts.items()},
            "loads": expert_loads(model), "combs": [c for b in model.layers for c in b.last_combs]}


def capture_step(model: Transformer, batch: torch.Tensor, weights: LossWeights, stage: str, grad_accum: int,
                 autocast: Callable[[], ContextManager], *, required: bool) -> GraphedLoss | None:
    """The stage's step captured as a CUDA graph; if the capture fails: raise when `required` (--cuda-graph on),
    else None (eager from then on, with a warning)."""
    log.info("capturing the %s stage's forward + backward as a CUDA graph", stage)
    try:
        return GraphedLoss(lambda b: step_outputs(model, b, weights, stage, grad_accum, autocast), batch,
                           list(model.parameters()))
    except RuntimeError as e:
        if required:
            raise
        log.warning("%s; training on without graphs", e)
        return None
