"""Training on a GPU: the plain-PyTorch references of the per-token ops and of the whole-sequence attention,
compiled by torch.compile. Their fp32 chains (mHC mixing and its 20 Sinkhorn rounds, norms, routing, SwiGLU,
masks and softmax of the attention) run eagerly as hundreds of memory-bound kernels forward and backward;
Inductor fuses each chain into a few kernels and derives the matching fused backward. Same math as the
references (the tests compare gradients). Chosen by `auto` for CUDA tensors under autograd; DSV4_COMPILE=0
turns it off (e.g. to debug, or where compilation is unavailable). `lazily_compiled` also serves the cache's
FP8/FP4 record codecs at inference (dsv4.cache.layout)."""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch

from .reference import experts, mhc, norm, routing, sequence_attn, sinkhorn


def lazily_compiled(fn: Callable) -> Callable:
    """fn compiled on its first call (so importing dsv4 compiles nothing)."""
    compiled = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, dynamic=None)
        # a training run meets a handful of shapes per op (sequence chunks, layer kinds): room for them all, so no
        # call falls back to eager (a recomputation must run the same graph as its forward)
        with torch._dynamo.config.patch(recompile_limit=64):
            return compiled(*args, **kwargs)
    return run


def compile_enabled() -> bool:
    """DSV4_COMPILE=0 keeps everything eager (e.g. to debug, or where compilation is unavailable)."""
    return os.environ.get("DSV4_COMPILE", "1") != "0"


def training_on_gpu(*args, **kwargs) -> bool:
    """CUDA tensors that autograd tracks (a training forward), unless DSV4_COMPILE=0."""
    if not compile_enabled() or not torch.is_grad_enabled():
        return False
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return bool(tensors) and tensors[0].is_cuda and any(t.requires_grad for t in tensors)


weighted_swiglu = lazily_compiled(experts.weighted_swiglu)

OPS: dict[str, Callable] = {
    "rms_norm": lazily_compiled(norm.rms_norm),
    "hc_mixes": lazily_compiled(mhc.hc_mixes),
    "hc_split_sinkhorn": lazily_compiled(sinkhorn.hc_split_sinkhorn),
    "hc_collapse": lazily_compiled(mhc.hc_collapse),
    "hc_post": lazily_compiled(mhc.hc_post),
    "moe_route": lazily_compiled(routing.moe_route),
    "sequence_attn": functools.partial(sequence_attn.sequence_attn,
                                       chunk_fn=lazily_compiled(sequence_attn.chunk_attn)),
}
