"""Optimisers as DeepSeek-V4 trains: Muon for hidden matrices, AdamW for the rest, one shared LR schedule."""
from .lr import lr_at
from .muon import V4_HYBRID, Muon, orthogonalize
from .param_groups import build_optimizers, split_params

__all__ = ["Muon", "orthogonalize", "V4_HYBRID", "split_params", "build_optimizers", "lr_at"]
