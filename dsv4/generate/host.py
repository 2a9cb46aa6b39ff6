"""Device results to the host in one wait, and host data to the device without one: a decode step's per-row
outputs (tokens, counts, flags) travel together, so the step synchronises with the device once; its small inputs
(counts, stop tokens) go up through pinned memory, as `torch.tensor(data, device="cuda")` waits for every kernel
queued before it (a blocking copy synchronises the stream)."""
from __future__ import annotations

import torch


class HostCopy:
    """Device tensors on their way to the host: the copies are queued behind the work that computes them and
    `wait()` returns them as Python lists. Queueing the copy of step t and waiting for it after step t + 1 is
    queued lets the host handle step t's results while the device runs step t + 1."""

    def __init__(self, tensors: list[torch.Tensor]):
        self._done = None
        if not tensors[0].is_cuda:
            self._host = tensors   # (computed already: a CPU op returns when it has run)
            return
        self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                      for t in tensors]
        self._done = torch.cuda.Event()
        self._done.record()

    def wait(self) -> list[list]:
        """The tensors as lists. On a GPU the wait is a CUDA event's synchronize, which lets go of the GIL, so the
        server's event loop streams tokens while the step finishes on the device."""
        if self._done is not None:
            self._done.synchronize()
        return [h.tolist() for h in self._host]


def to_host(tensors: list[torch.Tensor]) -> list[list]:
    """Device tensors as Python lists after one wait (HostCopy, waited for at once)."""
    return HostCopy(tensors).wait()


def read_once(values: dict[str, torch.Tensor | list[torch.Tensor]]) -> dict[str, float | list[float]]:
    """Every 0-dim tensor of `values` (a tensor, or a list of them, per name) as a Python float (a list of them),
    in one device-to-host transfer: an update loop keeps its logged values on the device and reads them here once.
    float64 holds each float32 / bfloat16 value exactly, so each float is what float(tensor) gives."""
    lists = {k: v if isinstance(v, list) else [v] for k, v in values.items()}
    flat = torch.stack([v.detach().reshape(()).double() for vs in lists.values() for v in vs]).tolist()
    out, i = {}, 0
    for k, vs in lists.items():
        out[k], i = flat[i:i + len(vs)], i + len(vs)
        if not isinstance(values[k], list):
            out[k] = out[k][0]
    return out


def to_device(data, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Python data (as `dtype`) or a host tensor (its own dtype) on `device`, sent asynchronously from pinned
    memory on a GPU (no wait)."""
    host = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if torch.device(device).type != "cuda" or host.device.type != "cpu":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
