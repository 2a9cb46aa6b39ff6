"""Scale-out on PyTorch's own stack: FSDP2 for dense parameters, expert parallelism for routed experts,
distributed Muon, torch.distributed.checkpoint, and tensor/expert-parallel sharded inference.
`DistributedPlacement` runs dsv4's one training loop on torchrun ranks (`torchrun ... -m dsv4 train`);
`ContextParallel` splits each sequence across ranks (`torchrun ... -m dsv4.distributed.train --cp N`), and
`context_parallel_prefill` prefills a long prompt's cache through it."""
from .checkpoint import export_official, load_distributed, save_distributed
from .context_parallel import ContextParallel
from .context_prefill import context_parallel_prefill
from .expert_parallel import shard_experts
from .muon import DistributedMuon
from .parallelize import finish_expert_grads, global_expert_loads, init_distributed, parallelize
from .placement import DistributedPlacement
from .tensor_parallel import load_sharded

__all__ = ["init_distributed", "parallelize", "shard_experts", "finish_expert_grads", "global_expert_loads",
           "DistributedMuon", "save_distributed", "load_distributed", "export_official", "load_sharded",
           "DistributedPlacement", "ContextParallel", "context_parallel_prefill"]
