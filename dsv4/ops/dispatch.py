"""Per-op backend choice: `backend=` argument > $DSV4_BACKEND > default ('reference' until kernels register)."""
from __future__ import annotations

import os
from typing import Callable

import torch

from . import compiled as _compiled
from . import gathered_experts as _gathered
from . import grouped_experts as _grouped
from .reference import attention as _ref_attn
from .reference import experts as _ref_experts
from .reference import mhc as _ref_mhc
from .reference import linear as _ref_linear
from .reference import norm as _ref_norm
from .reference import routing as _ref_routing
from .reference import pooling as _ref_pool
from .reference import rope as _ref_rope
from .reference import sequence_attn as _ref_seq
from .reference import sinkhorn as _ref_sinkhorn

# op name -> backend name -> (implementation, predicate saying whether it can run these arguments)
_REGISTRY: dict[str, dict[str, tuple[Callable, Callable[..., bool]]]] = {}


def register(op: str, backend: str, fn: Callable, supports: Callable[..., bool] = lambda *a, **k: True) -> None:
    _REGISTRY.setdefault(op, {})[backend] = (_outside_autocast(fn), supports)


def available_backends(op: str) -> list[str]:
    return sorted(_REGISTRY.get(op, {}))


def _pick(op: str, backend: str | None, *args, exclude: tuple[str, ...] = (), **kwargs) -> Callable:
    choice = backend or os.environ.get("DSV4_BACKEND") or "auto"
    impls = _REGISTRY[op]
    if choice == "auto":
        for name in ("triton", "grouped", "gathered", "compiled", "reference"):
            if name in impls and name not in exclude and impls[name][1](*args, **kwargs):
                return impls[name][0]
        raise RuntimeError(f"no backend of {op} supports these inputs")
    if choice not in impls:
        raise ValueError(f"backend {choice!r} has no {op}; available: {sorted(impls)}")
    return impls[choice][0]


def _outside_autocast(fn: Callable) -> Callable:
    """Ops choose their own precision (the references compute in fp32): never let autocast re-cast inside."""
    def run(*args, **kwargs):
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        if not torch.is_autocast_enabled(dev):
            return fn(*args, **kwargs)
        with torch.autocast(dev, enabled=False):
            return fn(*args, **kwargs)
    return run


register("sparse_attn", "reference", _ref_attn.sparse_attn)
register("sequence_attn", "reference", _ref_seq.sequence_attn)
register("indexer_topk", "reference", _ref_attn.indexer_topk)
register("index_scores", "reference", _ref_attn.index_scores)
register("compress_pool", "reference", _ref_pool.compress_pool)
register("compress_groups", "reference", _ref_pool.compress_groups)
register("compress_step", "reference", _ref_pool.compress_step)
register("rope_", "reference", _ref_rope.rope_)
register("rope", "reference", _ref_rope.rope)
register("hc_split_sinkhorn", "reference", _ref_sinkhorn.hc_split_sinkhorn)
register("moe_experts", "reference", _ref_experts.moe_experts)
register("hc_collapse", "reference", _ref_mhc.hc_collapse)
register("hc_post", "reference", _ref_mhc.hc_post)
register("hc_mixes", "reference", _ref_mhc.hc_mixes)
register("rms_norm", "reference", _ref_norm.rms_norm)
register("linear_fp32", "reference", _ref_linear.linear_fp32)
register("moe_route", "reference", _ref_routing.moe_route)
register("swiglu_expert", "reference", _ref_experts.swiglu_expert)
register("moe_experts", "gathered", _gathered.moe_experts,
         lambda x, w1, w2, w3, idx, *a: _gathered.supports(x) and _gathered.fits(idx))
if hasattr(torch, "_grouped_mm"):
    register("moe_experts", "grouped", _grouped.moe_experts, _grouped.supports)

for _op, _fn in _compiled.OPS.items():  # training on a GPU: the references compiled (fused fwd and bwd)
    register(_op, "compiled", _fn, _compiled.training_on_gpu)

try:  # GPU kernels: chosen by `auto` for CUDA tensors they support, selectable by name anywhere
    from .triton import compressor as _tri_compressor
    from .triton import experts as _tri_experts
    from .triton import indexer as _tri_indexer
    from .triton import mhc as _tri_mhc
    from .triton import linear as _tri_linear
    from .triton import norm as _tri_norm
    from .triton import routing as _tri_routing
    from .triton import rope as _tri_rope
    from .triton import sinkhorn as _tri_sinkhorn
    from .triton import sequence_attn as _tri_seq
    from .triton import sparse_attn as _tri_attn
except ImportError:  # no Triton on this machine: the references serve every call
    pass
else:
    register("sparse_attn", "triton", _tri_attn.sparse_attn, _tri_attn.supports)
    register("sequence_attn", "triton", _tri_seq.sequence_attn, _tri_seq.supports)
    register("indexer_topk", "triton", _tri_indexer.indexer_topk, _tri_indexer.supports)
    register("index_scores", "triton", _tri_indexer.index_scores, _tri_indexer.supports_scores)
    register("hc_split_sinkhorn", "triton", _tri_sinkhorn.hc_split_sinkhorn, _tri_sinkhorn.supports)
    register("moe_experts", "triton", _tri_experts.moe_experts, _tri_experts.supports)
    register("compress_step", "triton", _tri_compressor.compress_step, _tri_compressor.supports)
    register("compress_groups", "triton", _tri_compressor.compress_groups, _tri_compressor.supports_groups)
    register("rope_", "triton", _tri_rope.rope_, _tri_rope.supports)
    register("rope", "triton", _tri_rope.rope, _tri_rope.supports_differentiable)
    register("hc_collapse", "triton", _tri_mhc.hc_collapse, _tri_mhc.supports)
    register("hc_post", "triton", _tri_mhc.hc_post, _tri_mhc.supports_post)
    register("hc_mixes", "triton", _tri_mhc.hc_mixes, _tri_mhc.supports_mixes)
    register("rms_norm", "triton", _tri_norm.rms_norm, _tri_norm.supports)
    register("linear_fp32", "triton", _tri_linear.linear_fp32, _tri_linear.supports)
    register("moe_route", "triton", _tri_routing.moe_route, _tri_routing.supports)
    register("swiglu_expert", "triton", _tri_experts.swiglu_expert, _tri_experts.supports_dense)


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor, scale: float,
                entries: torch.Tensor | None = None, rope_dim: int = 0,
                *, backend: str | None = None) -> torch.Tensor:
    """o[b,s,h] = softmax-with-sink over rows[b, idx[b,s,:]] (idx -1 = masked), rows = kv followed by `entries`
    (float rows or FP8 serving records) if given. See reference.attention."""
    args = (q, kv, sink, idx, scale, entries, rope_dim)
    return _pick("sparse_attn", backend, *args)(*args)


def sequence_attn(q: torch.Tensor, kv: torch.Tensor, entries: torch.Tensor | None, entry_mask: torch.Tensor | None,
                  sink: torch.Tensor, scale: float, window: int, return_entry_probs: bool = False,
                  *, backend: str | None = None, recomputed: bool = False):
    """Whole-sequence attention: last `window` positions + masked compressed entries, sink in the softmax.
    Returns (o, entry probabilities or None). See reference.sequence_attn.
    recomputed: inside an activation-checkpointed block, never the compiled backend (a long sequence meets
    hundreds of chunk shapes, and a recomputation must save exactly what its forward saved)."""
    fn = _pick("sequence_attn", backend, q, kv, entries, entry_mask, sink, scale, window, return_entry_probs,
               exclude=("compiled",) if recomputed else ())
    return fn(q, kv, entries, entry_mask, sink, scale, window, return_entry_probs)


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, n_visible: torch.Tensor, k: int,
                 prefix: torch.Tensor | None = None, offset: int = 0, *, backend: str | None = None) -> torch.Tensor:
    """Top-k of sum_h w_h relu(q_h . key) over the first n_visible keys (-1 pads); with `prefix`, the
    attention's list [prefix | entries + offset]. See reference.attention."""
    fn = _pick("indexer_topk", backend, q, weights, keys, n_visible, k)
    return fn(q, weights, keys, n_visible, k, prefix, offset)


def index_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, *, backend: str | None = None
                 ) -> torch.Tensor:
    """All indexer scores sum_h w_h relu(q_h . key) [B, S, T] fp32 (whole sequences). See reference.attention."""
    return _pick("index_scores", backend, q, weights, keys)(q, weights, keys)


def compress_pool(kv: torch.Tensor, score: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Per-channel softmax-gated pooling over candidates: [B, G, n, D] -> [B, G, D] (fp32)."""
    return _pick("compress_pool", backend, kv, score)(kv, score)


def compress_groups(kv: torch.Tensor, score: torch.Tensor, ratio: int, overlap: bool, n: int,
                    prev: tuple[torch.Tensor, torch.Tensor] | None = None, ape: torch.Tensor | None = None,
                    *, backend: str | None = None) -> torch.Tensor:
    """The compressor's prefill pooling: n whole groups of `ratio` rows -> [B, n, d] fp32 entries (before their
    norm and RoPE), the overlapping windows and the position bias included. See reference.pooling."""
    args = (kv, score, ratio, overlap, n, prev, ape)
    return _pick("compress_groups", backend, *args)(*args)


def compress_step(kv: torch.Tensor, score: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
                  pos0: torch.Tensor, ratio: int, overlap: bool, norm_weight: torch.Tensor, eps: float,
                  freqs: torch.Tensor, out_dtype: torch.dtype, ape: torch.Tensor | None = None,
                  *, backend: str | None = None) -> torch.Tensor:
    """One decode token per row through a compressor: position bias (ape), state update, pooling, norm, RoPE ->
    entries [B, d]."""
    args = (kv, score, state_kv, state_score, pos0, ratio, overlap, norm_weight, eps, freqs, out_dtype, ape)
    return _pick("compress_step", backend, *args)(*args)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False,
          *, backend: str | None = None) -> torch.Tensor:
    """Rotate x's trailing rope channels in place (partial interleaved RoPE); returns x."""
    return _pick("rope_", backend, x, cos, sin)(x, cos, sin, inverse)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False,
         *, backend: str | None = None) -> torch.Tensor:
    """x with its trailing rope channels rotated, as a new tensor; differentiable (training)."""
    return _pick("rope", backend, x, cos, sin)(x, cos, sin, inverse)


def hc_split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
                      eps: float, *, backend: str | None = None):
    """mHC logits [..., (2+hc)*hc] -> pre [..., hc], post [..., hc], comb [..., hc, hc] (Sinkhorn-projected)."""
    return _pick("hc_split_sinkhorn", backend, mixes)(mixes, scale, base, hc, iters, eps)


def hc_collapse(x: torch.Tensor, weights: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """mHC lanes [..., R, C] -> sum_i weights[..., i] * lane_i [..., C] (fp32 math, x.dtype result)."""
    return _pick("hc_collapse", backend, x, weights)(x, weights)


def hc_post(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
            *, backend: str | None = None) -> torch.Tensor:
    """mHC post mix: lane'_k = post_k * f + sum_j comb[j, k] * lane_j (fp32 math, f.dtype result)."""
    return _pick("hc_post", backend, f, residual, post, comb)(f, residual, post, comb)


def moe_experts(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, idx: torch.Tensor,
                weights: torch.Tensor, swiglu_limit: float, *, backend: str | None = None) -> torch.Tensor:
    """Routed SwiGLU experts: y[n] = sum_j weights[n,j] * expert_{idx[n,j]}(x[n]) (fp32 [N, C]).

    The experts compute in x's dtype. Under CUDA autocast fp32 activations are cast to the autocast dtype first,
    as for every other projection: the routed experts then run as bf16 grouped GEMMs, not as the reference's
    fp32 per-expert loop (which also syncs with the host)."""
    if x.is_cuda and x.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        x = x.to(torch.get_autocast_dtype("cuda"))
    return _pick("moe_experts", backend, x, w1, w2, w3, idx)(x, w1, w2, w3, idx, weights, swiglu_limit)


def hc_mixes(x: torch.Tensor, fn: torch.Tensor, eps: float, *, backend: str | None = None) -> torch.Tensor:
    """mHC mixing logits (fn . x) / rms(x) of the flattened lanes [..., R, C] -> [..., M] fp32."""
    return _pick("hc_mixes", backend, x, fn)(x, fn, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             rope: tuple[torch.Tensor, torch.Tensor] | None = None, *, backend: str | None = None) -> torch.Tensor:
    """x / rms(x) over the last dim in x.dtype: times an fp32 weight in fp32 math, or unweighted in x.dtype math;
    with rope (cos, sin [B, S, half]) the result's trailing rope channels rotated too (inference: one kernel)."""
    return _pick("rms_norm", backend, x, weight)(x, weight, eps, rope)


def moe_route(logits: torch.Tensor, bias: torch.Tensor | None, fixed_idx: torch.Tensor | None, k: int,
              route_scale: float, *, backend: str | None = None):
    """Router logits [N, E] -> (weights [N, k], expert ids [N, k], affinities sqrt(softplus) [N, E])."""
    return _pick("moe_route", backend, logits)(logits, bias, fixed_idx, k, route_scale)


def swiglu_expert(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, swiglu_limit: float,
                  *, backend: str | None = None) -> torch.Tensor:
    """One SwiGLU expert on every token (the shared expert): w2(swiglu(w1 x, w3 x)) in x.dtype."""
    return _pick("swiglu_expert", backend, x, w1)(x, w1, w2, w3, swiglu_limit)


def linear_fp32(x: torch.Tensor, w: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """x @ w^T with fp32 products and output (V4's fp32 projections): [..., K] x [N, K] -> [..., N] fp32."""
    return _pick("linear_fp32", backend, x, w)(x, w)
