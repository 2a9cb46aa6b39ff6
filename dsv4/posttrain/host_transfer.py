"""The host's transfers in the post-training updates, made so the host does not wait for the device's queue.

At the post-training sizes the host's kernel launches take longer than the GPU's work: a read of a device value
(or a blocking copy to the device) in the middle of an update makes the host wait until the queue has drained
before it launches the next kernel. The updates keep their logged values on the device and read them with
`read_once`, and send host tensors with `to_device`.
"""
from __future__ import annotations

import torch

__all__ = ["read_once", "to_device"]


def read_once(values: dict[str, list[torch.Tensor]]) -> dict[str, list[float]]:
    """Every 0-dim tensor of `values` as a Python float, in one device-to-host transfer (float64 holds each of
    float32/bfloat16 exactly, so each float is what float(tensor) gives)."""
    flat = torch.stack([v.detach().reshape(()).double() for vs in values.values() for v in vs]).tolist()
    out, i = {}, 0
    for k, vs in values.items():
        out[k], i = flat[i:i + len(vs)], i + len(vs)
    return out


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`x` on `device`; to a GPU from pinned memory without waiting (a pageable copy waits for the queue)."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
