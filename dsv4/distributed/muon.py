"""Muon across ranks in the spirit of V4's ZeRO scheme (V4 §3.5.1): Newton-Schulz needs whole matrices, so
each FSDP-sharded matrix has one owner rank (assigned greedily by size, so the work is balanced) that
orthogonalises the gathered update; the result is broadcast and every rank applies its own rows. Momentum
stays sharded like the parameter (it is elementwise), so checkpoints reshard freely. Expert stacks (3-D,
expert-parallel) hold whole matrices locally and are orthogonalised where they live."""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from ..train.optim.muon import Muon, _matrix_shape, orthogonalize


class DistributedMuon(Muon):
    def _owners(self, group: dict) -> dict[int, int]:
        """Owner rank of each FSDP-sharded matrix (kept off the param groups: not checkpoint state)."""
        cache = self.__dict__.setdefault("_owner_cache", {})
        key = id(group["params"][0]) if group["params"] else 0
        if key not in cache:
            load: dict[int, int] = defaultdict(int)
            owners = {}
            sharded = [p for p in group["params"] if isinstance(p, DTensor) and p.ndim == 2]
            for p in sorted(sharded, key=lambda t: -t.numel()):   # largest first onto the least-loaded rank
                world = p.device_mesh.size()
                r = min(range(world), key=lambda i: (load[i], i))
                owners[id(p)], load[r] = r, load[r] + p.numel()
            cache[key] = owners
        return cache[key]

    def _step_group(self, group: dict) -> None:
        owners = self._owners(group)
        local_items: dict[tuple[int, int], list] = defaultdict(list)   # (target, update) to orthogonalise here
        gathered: list[tuple[Tensor, int, tuple[int, int]]] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            u = self._momentum(p, group)              # elementwise: works on each rank's shard
            n, m = _matrix_shape(p, group["matrix_shape"])
            if isinstance(p, DTensor) and p.ndim == 2:           # FSDP row shard: the owner needs it whole
                full = u.full_tensor()
                rank = p.device_mesh.get_local_rank()
                if owners[id(p)] == rank:
                    local_items[(n, m)].append((("full", p), full.reshape(-1, n, m)))
                gathered.append((p, owners[id(p)], (n, m)))
            else:                                                   # plain tensor or whole experts held here
                local_items[(n, m)].append((("local", p), _local(u).reshape(-1, n, m)))
        ns_dtype = group["ns_dtype"] or torch.float32
        lr, decay = group["lr"], 1 - group["lr"] * group["weight_decay"]
        results: dict[int, Tensor] = {}
        for (n, m), items in local_items.items():
            ortho = orthogonalize(torch.cat([u.to(ns_dtype) for _, u in items]), group["ns_coefficients"],
                                  group["eps"])
            scale = group["update_rms"] * math.sqrt(max(n, m))
            for ((kind, p), u), o in zip(items, ortho.split([u.shape[0] for _, u in items])):
                if kind == "local":
                    target = _local(p)
                    target.mul_(decay).add_(o.reshape(target.shape).to(target.dtype), alpha=-lr * scale)
                else:
                    results[id(p)] = (o.reshape(p.shape) * scale).to(p.dtype).contiguous()  # NS may return a transpose
        for p, owner, _ in gathered:                                # same order on every rank
            rank, world = p.device_mesh.get_local_rank(), p.device_mesh.size()
            full = results.get(id(p)) if owner == rank else torch.empty(p.shape, dtype=p.dtype, device=_local(p).device)
            dist.broadcast(full, src=dist.get_global_rank(p.device_mesh.get_group(), owner),
                           group=p.device_mesh.get_group())
            mine = full.chunk(world, dim=0)[rank]
            target = _local(p)
            target.mul_(decay).add_(mine.reshape(target.shape), alpha=-lr)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
