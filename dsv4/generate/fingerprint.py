"""A fingerprint of everything that decides what a model computes: every byte of every parameter and buffer, every
module's settings (its non-tensor attributes: switches such as `quant_sim`, hooks, sizes) and the config.

State the model computed (a stored prefix's cache) may be reused exactly while the fingerprint is unchanged, so it
covers all of them rather than a chosen few: a weight, a hash-routing table (`tid2eid`), an expert bias or a switch
set after the fact all change it.

The tensor part is one pass over the bytes on the tensors' own device: the bytes read as 64-bit words, each
multiplied by a fixed odd pseudo-random number for its position and summed with wraparound (mod 2^64). Multiplying
by an odd number is invertible mod 2^64, so changing any one word always changes the sum, and integer sums do not
depend on the order of the reduction, so the value is the same on every device. The per-tensor sums come to the
host together (one transfer) and go into a sha256 with the names, dtypes and shapes.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections import OrderedDict
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

ROW = 1 << 16             # words per row of the reduction (the length of the multiplier sequence)
SLAB_ROWS = 64            # rows per pass: 4M words, 32 MiB of int64 products at a time

# Attributes a forward pass sets on its modules as a record of itself (routing, mHC combs, the indexer loss);
# they are outputs, not settings.
RUNTIME_RECORDS = frozenset({"last_routing", "last_combs", "_combs_done", "indexer_kl"})

_multipliers: dict[torch.device, torch.Tensor] = {}
_SKIP = object()


def _multiplier_row(device: torch.device) -> torch.Tensor:
    """ROW fixed odd int64s (splitmix64 of 1..ROW): the same on every run and machine."""
    if device not in _multipliers:
        x = np.arange(1, ROW + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = (x ^ (x >> np.uint64(31))) | np.uint64(1)
        _multipliers[device] = torch.from_numpy(x.view(np.int64)).to(device)
    return _multipliers[device]


def _words(t: torch.Tensor) -> torch.Tensor:
    """The bytes of `t` as a flat int64 tensor, zero-padded to whole words."""
    b = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if b.numel() % 8:
        b = torch.cat((b, b.new_zeros(8 - b.numel() % 8)))
    try:
        return b.view(torch.int64)
    except RuntimeError:  # a view starting off an 8-byte boundary
        return b.clone().view(torch.int64)


def _weighted_sums(words: torch.Tensor) -> torch.Tensor:
    """Per row of ROW words: sum of word * multiplier (mod 2^64). [ceil(n / ROW)] int64."""
    mult = _multiplier_row(words.device)
    n = words.numel()
    full = n - n % ROW
    parts = [(words[s: min(full, s + ROW * SLAB_ROWS)].view(-1, ROW) * mult).sum(1)
             for s in range(0, full, ROW * SLAB_ROWS)]
    if n > full or n == 0:
        parts.append((words[full:] * mult[: n - full]).sum().view(1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _reduce(words: torch.Tensor) -> torch.Tensor:
    """Fold int64 words to one 0-dim int64 (rows of weighted sums, then the row sums the same way)."""
    sums = _weighted_sums(words)
    while sums.numel() > 1:
        sums = _weighted_sums(sums)
    return sums[0]


def tensor_sum(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim int64 on t's device that changes whenever any byte of `t` changes (see the module docstring)."""
    return _reduce(_words(t))


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over the names, dtypes and shapes of the tensors, in the given order, and over their bytes' sums: one
    per tensor of at least ROW words, one for all smaller tensors of a device together (fewer, larger passes)."""
    h = hashlib.sha256()
    small: dict[torch.device, list[torch.Tensor]] = {}
    sums: dict[torch.device, list[torch.Tensor]] = {}
    for name, t in named:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{t.device.type};".encode())
        words = _words(t)
        if words.numel() < ROW:
            small.setdefault(t.device, []).append(words)
        else:
            sums.setdefault(t.device, []).append(_reduce(words))
    for device, parts in small.items():
        sums.setdefault(device, []).append(_reduce(torch.cat(parts)))
    for device in sorted(sums, key=str):
        h.update(torch.stack(sums[device]).cpu().numpy().tobytes())
    return h.hexdigest()


def _describe(v: Any) -> Any:
    """A JSON-able description of a setting's value, _SKIP for tensors and modules (covered elsewhere)."""
    if v is None or type(v) in (bool, int, str):
        return v
    if type(v) in (dict, OrderedDict) and not v:
        return {}
    if isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (torch.dtype, torch.device, enum.Enum)):
        return str(v)
    if isinstance(v, (torch.Tensor, nn.Module)):
        return _SKIP
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return _describe({f.name: getattr(v, f.name) for f in dataclasses.fields(v)})
    if isinstance(v, (list, tuple, set, frozenset)):
        items = [_describe(x) for x in v]
        if any(x is _SKIP for x in items):
            return _SKIP
        if isinstance(v, (set, frozenset)):
            items = sorted(items, key=lambda x: json.dumps(x, sort_keys=True))
        return [type(v).__name__, items]
    if isinstance(v, dict):
        d = {str(k): _describe(x) for k, x in v.items()}
        return _SKIP if any(x is _SKIP for x in d.values()) else d
    if callable(v):
        return f"{getattr(v, '__module__', None)}.{getattr(v, '__qualname__', type(v).__qualname__)}"
    return f"{type(v).__module__}.{type(v).__qualname__}"


def module_settings(model: nn.Module) -> str:
    """JSON of every module's type and non-tensor attributes (hooks by their functions' names, in order)."""
    out = []
    for name, m in model.named_modules():
        attrs = {}
        for k, v in sorted(vars(m).items()):
            if k in ("_parameters", "_buffers", "_modules") or k in RUNTIME_RECORDS:
                continue
            if "hooks" in k and isinstance(v, dict):
                if not v:
                    continue
                v = list(v.values())  # keyed by process-wide handle ids, which differ between runs
            d = _describe(v)
            if d is not _SKIP:
                attrs[k] = d
        out.append([name, f"{type(m).__module__}.{type(m).__qualname__}", attrs])
    return json.dumps(out, sort_keys=True)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the module settings and of all bytes of every parameter and buffer (one pass over the weights)."""
    h = hashlib.sha256(module_settings(model).encode())
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    h.update(tensors_digest(named).encode())
    return h.hexdigest()
