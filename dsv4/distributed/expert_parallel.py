"""Expert parallelism: each rank holds a contiguous range of the routed experts (a DTensor sharded on the
expert dimension, so torch.distributed.checkpoint can reshard it), and tokens travel to their experts.

Two ways to run the routed sum across ranks:
  * "all_to_all" (training, data parallel: every rank has different tokens): each (token, slot) pair is sent
    to the rank owning its expert, computed there, sent back and summed per token. Differentiable.
  * "all_reduce" (sharded inference, every rank has the same tokens, as the reference shards experts): each
    rank computes the slots of its own experts and the partial sums are all-reduced.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from ..model import Transformer
from ..model.moe import MoE


def expert_range(n_experts: int, world: int, rank: int) -> tuple[int, int]:
    if n_experts % world:
        raise ValueError(f"n_routed_experts={n_experts} is not divisible by the {world} expert-parallel ranks")
    per = n_experts // world
    return rank * per, per


def shard_experts(model: Transformer, mesh: DeviceMesh, mode: str = "all_to_all") -> Transformer:
    """Keep only this rank's experts (as DTensor shards of the full stacks) and route tokens across ranks."""
    if mode not in ("all_to_all", "all_reduce"):
        raise ValueError(f"mode must be 'all_to_all' or 'all_reduce', got {mode!r}")
    group, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    for moe in model.modules():
        if not isinstance(moe, MoE):
            continue
        n_experts = moe.experts.w1.shape[0]
        offset, per = expert_range(n_experts, world, rank)
        for name in ("w1", "w2", "w3"):
            full = getattr(moe.experts, name)
            local = full.detach()[offset:offset + per].clone()
            setattr(moe.experts, name, nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False)))
        fn = _all_to_all if mode == "all_to_all" else _all_reduce
        moe.dispatch = partial(fn, moe=moe, group=group, offset=offset, per=per, world=world)
    return model


def expert_params(model: nn.Module) -> set[nn.Parameter]:
    return {p for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters()}


def _all_reduce(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, *, moe: MoE, group, offset: int,
                per: int, world: int) -> torch.Tensor:
    mine = (idx >= offset) & (idx < offset + per)
    tok, slot = mine.nonzero(as_tuple=True)
    y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    if tok.numel():
        part = moe.routed(x[tok], idx[tok, slot].unsqueeze(1), weights[tok, slot].unsqueeze(1), expert_offset=offset)
        y = y.index_add(0, tok, part)
    dist.all_reduce(y, group=group)
    return y


def _all_to_all(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, *, moe: MoE, group, offset: int,
                per: int, world: int) -> torch.Tensor:
    N, k = idx.shape
    flat = idx.flatten()
    order = torch.argsort(flat // per, stable=True)                       # (token, slot) pairs by owner rank
    send = torch.bincount(flat // per, minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    send_l, recv_l = send.tolist(), recv.tolist()
    tok = order // k
    rows = _exchange(x[tok].contiguous(), recv_l, send_l, group)
    w = _exchange(weights.flatten()[order].contiguous(), recv_l, send_l, group)
    ids = torch.empty(sum(recv_l), dtype=flat.dtype, device=flat.device)
    dist.all_to_all_single(ids, flat[order].contiguous(), recv_l, send_l, group=group)
    out = moe.routed(rows, ids.unsqueeze(1), w.unsqueeze(1), expert_offset=offset)   # [received, C] fp32
    back = _exchange(out.contiguous(), send_l, recv_l, group)
    return torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device).index_add(0, tok, back)


def _exchange(t: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable all-to-all (the backward sends gradients the reverse way)."""
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(t, out_splits, in_splits, group))
