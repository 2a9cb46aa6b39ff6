"""Which device a model is loaded onto: 'auto' picks one, and an explicit one is checked to exist here before
anything is built on it (torch's own failure, e.g. an AssertionError for 'cuda' on a CPU-only build, names
neither the argument nor what to do)."""
from __future__ import annotations

import torch

from ..errors import InvalidArgument

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device that exists on this machine; 'auto' is the GPU if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgument(f"device={device!r}: not a device here; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InvalidArgument(f"device={device!r}: CUDA is not available ({why}, torch {torch.__version__}); "
                                  "use 'cpu'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InvalidArgument(f"device={device!r}: this machine has {count} CUDA device(s), "
                                  f"cuda:0..cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidArgument(f"device={device!r}: MPS is not available on this machine; use 'cpu'")
    return dev
