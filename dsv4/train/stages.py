"""The V4 attention schedule by step: dense warm-up (CSA attends to every visible entry, the indexer idle),
indexer warm-up (dense attention, only the indexer learns, from its KL loss), then sparse training (top-k
selection, KL kept)."""
from __future__ import annotations

from ..model import Transformer
from ..model.attention import Attention
from .config import TrainConfig

__all__ = ["stage_at", "set_stage", "has_indexer"]


def stage_at(cfg: TrainConfig, step: int, *, indexer: bool = True) -> str:
    """'dense', 'indexer' or 'sparse' (by fraction of the run). A model without an indexer (the dense-attention
    ablation, say) has nothing to warm up: `indexer=False` turns the indexer stage into 'sparse'."""
    dense_end = round(cfg.dense_warmup_frac * cfg.steps)
    if step < dense_end:
        return "dense"
    if step < dense_end + round(cfg.indexer_warmup_frac * cfg.steps):
        return "indexer" if indexer else "sparse"
    return "sparse"


def set_stage(model: Transformer, stage: str) -> None:
    """Switch every attention layer to the stage's computation."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.sparse = stage == "sparse"
            m.indexer_loss = stage != "dense"


def has_indexer(model: Transformer) -> bool:
    return any(hasattr(a, "indexer") for a in model.modules() if isinstance(a, Attention))
