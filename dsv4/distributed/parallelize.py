"""Placing a built model on several ranks (torchtitan style: parallelism is applied after construction).

`parallelize(model, mesh)`: routed experts expert-parallel (all-to-all dispatch), every other parameter
FSDP2-sharded (`fully_shard` per block, then the root), data parallel over the rest of the batch.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from ..model import Transformer
from ..model.attention import Attention
from ..model.indexer import Indexer
from ..model.moe import MoE
from .expert_parallel import expert_params, shard_experts


def init_distributed() -> DeviceMesh:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs); a 1-D mesh over all ranks."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError("not launched by torchrun: run `torchrun --nproc_per_node N -m dsv4 train`")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device, (dist.get_world_size(),))


def parallelize(model: Transformer, mesh: DeviceMesh, *, bf16: bool = False) -> Transformer:
    """Expert parallelism for routed experts, FSDP2 for everything else (bf16 compute, fp32 reductions)."""
    shard_experts(model, mesh, mode="all_to_all")
    # experts are sharded by expert already; the balancing biases are not trained and every rank updates them
    # identically from the all-reduced loads, so they stay plain replicated tensors
    ignored = expert_params(model) | {m.gate.bias for m in moe_layers(model) if not m.gate.hashed}
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for indexer in indexers(model):
        # The indexer learns from its own KL loss on detached inputs: in the indexer warm-up no gradient flows
        # through its block's output, where the block's backward hook would gather the parameters again. As
        # its own unit, the indexer's scores carry that hook.
        fully_shard(indexer, mesh=mesh, mp_policy=mp, ignored_params=ignored)
        register_fsdp_forward_method(indexer, "sequence_scores")
    for block in list(model.layers) + list(model.mtp):
        fully_shard(block, mesh=mesh, mp_policy=mp, ignored_params=ignored)
        register_fsdp_forward_method(block, "forward_recomputed")   # block recompute calls it, not forward
        block.recompute_context = _gathered_for_recompute(block, ignored)
    for block in model.mtp:
        register_fsdp_forward_method(block, "collapse")
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored)
    for method in ("hidden", "logits", "mtp_logits"):  # the trainer calls these, not forward
        register_fsdp_forward_method(model, method)
    return model


def _gathered_for_recompute(block: FSDPModule, ignored: set) -> Callable[[], AbstractContextManager[None]]:
    """The block's recompute context (Block.recompute_context): its parameters gathered for the recompute.

    A gradient reaching the block's output fires FSDP2's pre-backward hook, which gathers them before any of the
    block's backward runs (the main stages). In the indexer warm-up no gradient reaches a block's output (the
    indexer learns from its KL loss on detached inputs), but the KL's backward needs the recomputed attention,
    which reads the block's parameters: gather them here and shard them again afterwards. Nothing of the block
    but the indexer (its own FSDP unit, gathered by its own hooks) is differentiated then, so no backward reads
    the block's parameters after the reshard. The gather is a collective: the recompute starts at the KL's last
    op, which every rank reaches at the same point of its backward pass."""
    # a parameter FSDP2 manages: a sharded DTensor while the block is sharded, a plain tensor while gathered
    # (not one of the indexer's: a unit of its own)
    nested = {p for m in block.modules() if m is not block and isinstance(m, FSDPModule) for p in m.parameters()}
    name = next(n for n, p in block.named_parameters() if p not in ignored and p not in nested)

    @contextmanager
    def gathered() -> Iterator[None]:
        sharded = isinstance(block.get_parameter(name), DTensor)
        if sharded:
            block.unshard()
        try:
            yield
        finally:
            if sharded:
                block.reshard()
    return gathered


def finish_expert_grads(model: Transformer, world: int) -> None:
    """Expert gradients arrive summed over the ranks' losses (through the all-to-all); FSDP averages the dense
    ones. Divide so both are gradients of the mean loss."""
    for p in expert_params(model):
        if p.grad is not None:
            p.grad.div_(world)


@torch.no_grad()
def global_expert_loads(loads: list[torch.Tensor], group=None) -> list[torch.Tensor]:
    """Sum the per-rank expert loads so every rank nudges the balancing bias identically."""
    if not loads:
        return loads
    flat = torch.cat(loads)
    dist.all_reduce(flat, group=group)
    return list(flat.split([t.numel() for t in loads]))


def indexers(model: Transformer) -> list[Indexer]:
    return [m.indexer for m in model.modules() if isinstance(m, Attention) and hasattr(m, "indexer")]


def moe_layers(model: Transformer) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]
