"""Muon across ranks in the spirit of V4's ZeRO scheme (V4 §3.5.1): Newton-Schulz needs whole matrices, so
each FSDP-sharded matrix has one owner rank (assigned greedily by size, so the work is balanced) that
orthogonalises the gathered update; the result is broadcast and every rank applies its own rows. Momentum
stays sharded like the parameter (it is elementwise), so checkpoints reshard freely. Expert stacks (3-D,
expert-parallel) hold whole matrices locally and are orthogonalised where they live.

The step itself (momentum, grouping by shape, batched Newton-Schulz, scaled update with decay) is Muon's;
this class only says where each matrix is orthogonalised and how the result reaches every rank."""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from ..train.optim.muon import Muon


class DistributedMuon(Muon):
    def orthogonalize_here(self, p: Tensor, update: Tensor, shape: tuple[int, int]) -> Tensor | None:
        """Row-sharded matrices are gathered whole (every rank takes part) and kept by their owner; the rest
        are orthogonalised where they are."""
        if not _row_sharded(p):
            return _local(update).reshape(-1, *shape)
        full = update.full_tensor()
        return full.reshape(-1, *shape) if self._owner(p) == p.device_mesh.get_local_rank() else None

    def apply_update(self, p: Tensor, ortho: Tensor | None, step_size: float, decay: float) -> None:
        """The owner broadcasts a row-sharded matrix's orthogonalised update; each rank applies its rows."""
        if not _row_sharded(p):
            super().apply_update(_local(p), ortho, step_size, decay)
            return
        mesh = p.device_mesh
        rank, world, group = mesh.get_local_rank(), mesh.size(), mesh.get_group()
        owner = self._owner(p)
        full = (ortho.reshape(p.shape).to(p.dtype).contiguous() if owner == rank  # NS may return a transpose
                else torch.empty(p.shape, dtype=p.dtype, device=_local(p).device))
        dist.broadcast(full, src=dist.get_global_rank(group, owner), group=group)
        super().apply_update(_local(p), full.chunk(world, dim=0)[rank], step_size, decay)

    def _owner(self, p: Tensor) -> int:
        """Owner rank of a row-sharded matrix: per param group, largest first onto the least-loaded rank (kept
        off the param groups: not checkpoint state)."""
        owners = self.__dict__.setdefault("_owners", {})
        if id(p) not in owners:
            for group in self.param_groups:
                load: dict[int, int] = defaultdict(int)
                for q in sorted((q for q in group["params"] if _row_sharded(q)), key=lambda t: -t.numel()):
                    r = min(range(q.device_mesh.size()), key=lambda i: (load[i], i))
                    owners[id(q)], load[r] = r, load[r] + q.numel()
        return owners[id(p)]


def _row_sharded(t: Tensor) -> bool:
    """An FSDP-sharded matrix: a 2-D DTensor (expert stacks are 3-D and hold whole matrices)."""
    return isinstance(t, DTensor) and t.ndim == 2


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
