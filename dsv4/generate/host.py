"""Device results to the host in one wait: a decode step's per-row outputs (tokens, counts, flags) travel
together, so the step synchronises with the device once."""
from __future__ import annotations

import torch


def to_host(tensors: list[torch.Tensor]) -> list[list]:
    """Device tensors as Python lists after one wait. On a GPU the wait is a CUDA event's synchronize, which lets
    go of the GIL, so the server's event loop streams tokens while the step finishes on the device."""
    if not tensors[0].is_cuda:
        return [t.tolist() for t in tensors]
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors]
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return [h.tolist() for h in host]
