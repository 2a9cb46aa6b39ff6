"""Sharded inference for checkpoints larger than one GPU, sharded as the reference shards them: attention heads
tensor-parallel (wq_b rows, attn_sink, wo_a head groups, wo_b columns + an all-reduce of the output), routed
experts expert-parallel by contiguous ranges (partial sums all-reduced); the rest replicated. Each rank reads
only its slices from the safetensors shards (plain tensors through `get_slice`; FP8/FP4 tensors one at a time,
dequantised, then sliced; with native weights, FP8 tensors are sliced as bytes and scale tiles), through the one
checkpoint planner of `dsv4.checkpoint.load`. The indexer is replicated here (the reference shards its heads
too)."""
from __future__ import annotations

import os
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..checkpoint.load import WEIGHTS, Piece, load_weights, pack_native, plan_checkpoint
from ..checkpoint.names import Target
from ..config import ModelConfig
from ..model import Transformer
from ..model.attention import Attention
from ..model.moe import MoE
from .expert_parallel import _all_reduce, expert_range

_EXPERT_STACKS = (".experts.w1", ".experts.w2", ".experts.w3")


def _sum_over(group, x: torch.Tensor) -> torch.Tensor:
    y = x.float()
    dist.all_reduce(y, group=group)
    return y.to(x.dtype)


def _shard_attention(a: Attention, cfg: ModelConfig, world: int, group) -> None:
    if cfg.n_heads % world or cfg.o_groups % world:
        raise ValueError(f"n_heads={cfg.n_heads} and o_groups={cfg.o_groups} must be divisible by {world} ranks")
    hl, gl, D, r = cfg.n_heads // world, cfg.o_groups // world, cfg.head_dim, cfg.o_lora_rank
    a.n_heads, a.n_groups = hl, gl
    dt = a.wq_b.weight.dtype
    a.wq_b.weight = nn.Parameter(torch.empty(hl * D, cfg.q_lora_rank, dtype=dt))
    a.attn_sink = nn.Parameter(torch.empty(hl, dtype=torch.float32))
    a.wo_a.weight = nn.Parameter(torch.empty(gl * r, cfg.n_heads * D // cfg.o_groups, dtype=dt))
    a.wo_b.weight = nn.Parameter(torch.empty(cfg.dim, gl * r, dtype=dt))
    a.output_reduce = partial(_sum_over, group)


def _part(rank: int, n: int) -> slice:
    return slice(rank * n, (rank + 1) * n)


class _RankSlicing:
    """What one rank keeps of each checkpoint tensor: its heads' rows of wq_b / attn_sink / wo_a, its groups'
    columns of wo_b, its contiguous range of routed experts; everything else whole."""

    def __init__(self, cfg: ModelConfig, world: int, rank: int):
        hl, gl = cfg.n_heads // world, cfg.o_groups // world
        self.rows = {".attn.wq_b.weight": _part(rank, hl * cfg.head_dim), ".attn.attn_sink": _part(rank, hl),
                     ".attn.wo_a.weight": _part(rank, gl * cfg.o_lora_rank)}
        self.cols = _part(rank, gl * cfg.o_lora_rank)
        self.offset, self.per = expert_range(cfg.n_routed_experts, world, rank)

    def __call__(self, target: Target, piece: Piece) -> Piece | None:
        for suffix, rows in self.rows.items():
            if target.param.endswith(suffix):
                return Piece((rows,))
        if target.param.endswith(".attn.wo_b.weight"):
            return Piece((slice(None), self.cols))
        if target.param.endswith(_EXPERT_STACKS):
            if piece.expert is not None:                     # one expert's tensor (official naming)
                local = piece.expert - self.offset
                return Piece(piece.index, local) if 0 <= local < self.per else None
            experts = slice(self.offset, self.offset + self.per)    # a fused stack of all experts (transformers)
            return Piece((experts, *piece.index[1:]))
        return piece


def load_sharded(path: str | os.PathLike, mesh: DeviceMesh, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.bfloat16, weights: str = "bf16") -> Transformer:
    """This rank's part of the model in `path`; run it on the same tokens on every rank of `mesh`.

    The checkpoint is checked against the full model exactly as `load_model` checks it, before any weight is
    read; this rank then reads only the slices `_RankSlicing` keeps. weights="native" keeps this rank's FP4
    routed experts and its parts of the FP8 layers in their checkpoint bytes and scales (a layer whose slice cuts
    through 128 x 128 scale tiles, possible only in small models, is dequantised)."""
    return load_part(path, mesh.size(), mesh.get_local_rank(), mesh.get_group(), device, dtype, weights)


def load_part(path: str | os.PathLike, world: int, rank: int, group, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.bfloat16, weights: str = "bf16") -> Transformer:
    """`load_sharded` for rank `rank` of `world`, with the collectives over `group` (used only when it runs)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: choose from {list(WEIGHTS)}")
    plan = plan_checkpoint(path)
    cfg = plan.config
    offset, per = expert_range(cfg.n_routed_experts, world, rank)
    with torch.device("meta"):
        model = Transformer(cfg).to_dtype(dtype)
        for m in model.modules():
            if isinstance(m, Attention):
                _shard_attention(m, cfg, world, group)
            elif isinstance(m, MoE):
                for name in ("w1", "w2", "w3"):
                    full = getattr(m.experts, name)
                    setattr(m.experts, name, nn.Parameter(torch.empty(per, *full.shape[1:], dtype=full.dtype)))
                m.dispatch = partial(_all_reduce, moe=m, group=group, offset=offset, per=per, world=world)
    slicing = _RankSlicing(cfg, world, rank)
    if weights == "native":
        pack_native(plan, model, slicing)   # on this rank's shapes: its heads, groups and experts
    return load_weights(plan, model, device, slicing=slicing, progress=None if rank == 0 else False)
