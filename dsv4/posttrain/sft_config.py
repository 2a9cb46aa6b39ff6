"""The settings of SFT (and of pre-training, which runs SFT's loop): dsv4.posttrain.sft, step_loop, pretrain."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidArgument

__all__ = ["SFTConfig"]


@dataclass(kw_only=True)
class SFTConfig:
    steps: int | None = None      # None: `epochs` passes over the data
    epochs: int = 1
    lr: float = 3e-4
    batch_size: int = 8
    seq_len: int = 512
    pack: bool = True
    thinking: bool = False        # rendering of conversations that do not say
    warmup: int = 5
    min_lr_ratio: float = 0.1
    optimizer: str = "muon"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mtp_weight: float = 0.3
    indexer_kl_weight: float = 1.0
    bias_update_speed: float = 1e-3
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    max_seconds: float = 0.0      # a wall-time cap (0: none) on the steps after the first (the warm-up, whose
                                  # compilation is logged as warmup_s): the schedule shrinks to the steps that fit
    length_bucket: int = 0        # batch lengths rounded up to a multiple of this (buckets.py; 0: 64 on a GPU)
    cuda_graph: str = "auto"      # capture the step as a CUDA graph: "auto" (on a GPU, eager if the capture
                                  # fails), "on" (a failed capture raises), "off"
    static_shapes: bool | None = None   # SFT batches of one shape (rows of seq_len rounded up to the bucket, every
                                  # batch batch_size rows, packed documents in fixed attention slots); None: where
                                  # graphs are on. Pre-training's stream rows always have one shape
    slot_headroom: float = 0.05   # static packed SFT: attention slots planned for 5% more documents (of each length
                                  # and longer) than the first epoch's batches hold at most (doc_slots.fit_plan)
    log_every: int = 10           # steps between reads of the logged values from the device (each a wait for
                                  # the GPU); every step still gets its row

    def check(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise InvalidArgument(f"steps must be >= 1, got {self.steps}")
        if self.seq_len < 2:
            raise InvalidArgument(f"seq_len must be >= 2, got {self.seq_len}")
        if not self.lr > 0:
            raise InvalidArgument(f"lr must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise InvalidArgument(f"warmup must be >= 0, got {self.warmup}")
        if self.length_bucket < 0:
            raise InvalidArgument(f"length_bucket must be >= 0, got {self.length_bucket}")
        if self.optimizer not in ("muon", "adamw"):
            raise InvalidArgument(f"optimizer must be 'muon' or 'adamw', got {self.optimizer!r}")
        if self.cuda_graph not in ("auto", "on", "off"):
            raise InvalidArgument(f"cuda_graph must be 'auto', 'on' or 'off', got {self.cuda_graph!r}")
        if self.log_every < 1:
            raise InvalidArgument(f"log_every must be >= 1, got {self.log_every}")

    def graphs_on(self, device: torch.device) -> bool:
        """Whether steps of one shape replay a CUDA graph on `device`."""
        if self.cuda_graph == "on" and device.type != "cuda":
            raise InvalidArgument(f"cuda_graph='on' needs a CUDA device, got {device}")
        return device.type == "cuda" and self.cuda_graph != "off"

    def static_on(self, device: torch.device) -> bool:
        """Whether SFT batches are built in one shape."""
        return self.graphs_on(device) if self.static_shapes is None else self.static_shapes
