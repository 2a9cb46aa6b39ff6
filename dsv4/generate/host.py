"""Device results to the host in one wait, and host data to the device without one: a decode step's per-row
outputs (tokens, counts, flags) travel together, so the step synchronises with the device once; its small inputs
(counts, stop tokens) go up through pinned memory, as `torch.tensor(data, device="cuda")` waits for every kernel
queued before it (a blocking copy synchronises the stream)."""
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


def to_device(data, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Python data as a tensor on `device`, sent asynchronously from pinned memory on a GPU (no wait)."""
    host = torch.tensor(data, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
