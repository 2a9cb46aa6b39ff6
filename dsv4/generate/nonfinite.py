"""Where non-finite logits come from: re-run a sequence with a check on every module's output.

Generation checks each step's logits with one reduction (engine.decode_loop); only when they are non-finite does
it call `find_nonfinite`, which runs the row's tokens again through a fresh cache with forward hooks and names the
first module whose output is non-finite although its inputs were finite: the module (or, when the fault lies in
code between modules, the block) that produced the first inf or NaN.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


class NonFiniteWarning(RuntimeWarning):
    """The model produced inf or NaN logits (e.g. broken weights); the affected rows stop generating."""


@dataclass(frozen=True)
class NonFiniteSite:
    module: str        # the producing module's name in the model ("" = the model's own code after the blocks)
    layer: int | None  # its block index, None outside the blocks

    def describe(self) -> str:
        if self.layer is not None:
            return f"layer {self.layer} (module {self.module})"
        if self.module == "":
            return "after the last layer (hc_head collapse or LM head)"
        return f"module {self.module}"


class _Found(Exception):
    def __init__(self, site: NonFiniteSite):
        self.site = site


def _floats(obj) -> Iterator[torch.Tensor]:
    """The floating-point tensors among a module's plain inputs or outputs (tensors, tuples, lists)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _floats(x)


def _finite(obj) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _floats(obj))


@torch.no_grad()
def find_nonfinite(model, tokens: Sequence[int], kv_dtype: str = "auto", index_dtype: str = "auto",
                   chunk: int = 4096) -> NonFiniteSite | None:
    """Run `tokens` (one sequence) through the model on a fresh cache of the given formats, in chunks as a
    prefill does, and return the first module whose output is non-finite from finite inputs; None if every
    output and the logits are finite. Slow (a host sync per module): for the failure path only."""
    def hook(module, args, kwargs, output):
        if not _finite(output) and _finite(args) and _finite(list(kwargs.values())):
            name = names[module]
            layer = re.match(r"layers\.(\d+)(\.|$)", name)
            raise _Found(NonFiniteSite(name, int(layer.group(1)) if layer else None))

    names = {m: n for n, m in model.named_modules() if not n.startswith("mtp")}
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in names]
    device = model.embed.weight.device
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
    cache = model.new_cache(1, ids.shape[1], kv_dtype, index_dtype)
    try:
        for start in range(0, ids.shape[1], chunk):
            model(ids[:, start:start + chunk], cache=cache, last_only=True)
    except _Found as found:
        return found.site
    finally:
        for h in handles:
            h.remove()
    return None
