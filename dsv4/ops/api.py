"""The public ops: one signature and contract each; every call forwards to the implementation `dispatch` picks
(`backend=` names one explicitly). The contracts' spec is the plain-PyTorch code in reference/."""
from __future__ import annotations

import torch

from .dispatch import _pick


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor, scale: float,
                entries: torch.Tensor | None = None, rope_dim: int = 0,
                *, backend: str | None = None) -> torch.Tensor:
    """o[b,s,h] = softmax-with-sink over rows[b, idx[b,s,:]] (idx -1 = masked), rows = kv followed by `entries`
    (float rows or FP8 serving records) if given. See reference/sparse_attn.py."""
    args = (q, kv, sink, idx, scale, entries, rope_dim)
    return _pick("sparse_attn", backend, *args)(*args)


def sequence_attn(q: torch.Tensor, kv: torch.Tensor, entries: torch.Tensor | None, entry_mask: torch.Tensor | None,
                  sink: torch.Tensor, scale: float, window: int, return_entry_probs: bool = False,
                  *, backend: str | None = None, recomputed: bool = False):
    """Whole-sequence attention: last `window` positions + masked compressed entries, sink in the softmax.
    Returns (o, entry probabilities or None). See reference/sequence_attn.py.
    recomputed: inside an activation-checkpointed block, never the compiled backend (a long sequence meets
    hundreds of chunk shapes, and a recomputation must save exactly what its forward saved)."""
    fn = _pick("sequence_attn", backend, q, kv, entries, entry_mask, sink, scale, window, return_entry_probs,
               exclude=("compiled",) if recomputed else ())
    return fn(q, kv, entries, entry_mask, sink, scale, window, return_entry_probs)


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, n_visible: torch.Tensor, k: int,
                 prefix: torch.Tensor | None = None, offset: int = 0, *, backend: str | None = None) -> torch.Tensor:
    """Top-k of sum_h w_h relu(q_h . key) over the first n_visible keys (-1 pads); with `prefix`, the
    attention's list [prefix | entries + offset]. See reference/indexer.py."""
    fn = _pick("indexer_topk", backend, q, weights, keys, n_visible, k)
    return fn(q, weights, keys, n_visible, k, prefix, offset)


def index_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, *, backend: str | None = None
                 ) -> torch.Tensor:
    """All indexer scores sum_h w_h relu(q_h . key) [B, S, T] fp32 (whole sequences). See reference/indexer.py."""
    return _pick("index_scores", backend, q, weights, keys)(q, weights, keys)


def compress_pool(kv: torch.Tensor, score: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Per-channel softmax-gated pooling over candidates: [B, G, n, D] -> [B, G, D] (fp32)."""
    return _pick("compress_pool", backend, kv, score)(kv, score)


def compress_groups(kv: torch.Tensor, score: torch.Tensor, ratio: int, overlap: bool, n: int,
                    prev: tuple[torch.Tensor, torch.Tensor] | None = None, ape: torch.Tensor | None = None,
                    *, backend: str | None = None) -> torch.Tensor:
    """The compressor's prefill pooling: n whole groups of `ratio` rows -> [B, n, d] fp32 entries (before their
    norm and RoPE), the overlapping windows and the position bias included. See reference/compressor.py."""
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


def compress_steps(kv: torch.Tensor, score: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
                   pos0: torch.Tensor, ratio: int, overlap: bool, norm_weight: torch.Tensor, eps: float,
                   freqs: torch.Tensor, out_dtype: torch.dtype, ape: torch.Tensor | None = None,
                   *, backend: str | None = None) -> torch.Tensor:
    """S decode tokens per row (kv, score [B, S, coff*d]) through a compressor, one after another: compress_step's
    entries [B, S, d] and state, in fewer launches (a speculative verify). See reference/compressor.py."""
    args = (kv, score, state_kv, state_score, pos0, ratio, overlap, norm_weight, eps, freqs, out_dtype, ape)
    return _pick("compress_steps", backend, *args)(*args)


def cos_sin(angles: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of fp32 angles: RoPE's tables (reference/rope.py says why the CPU evaluates them in float64)."""
    return _pick("cos_sin", backend, angles)(angles)


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
    """Routed SwiGLU experts: y[n] = sum_j weights[n,j] * expert_{idx[n,j]}(x[n]) (fp32 [N, C]); the experts
    compute in x's dtype."""
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


def linear(x: torch.Tensor, w: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """x @ w^T in x's dtype (under autocast, cast as autocast casts nn.Linear): [..., K] x [N, K] -> [..., N]."""
    return _pick("linear", backend, x, w)(x, w)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Each group through its own projection (attention's grouped low-rank output, wo_a per head group):
    x [B, S, G, I], w [G, R, I] -> [B, S, G, R] in x's dtype (under autocast, cast as autocast casts einsum)."""
    return _pick("grouped_linear", backend, x, w)(x, w)


def linear_fp8_weight(x: torch.Tensor, w, *, backend: str | None = None) -> torch.Tensor:
    """x @ w^T with w an Fp8BlockWeight (e4m3 [N, K], 128x128 UE8M0 scales) dequantised on the fly: [..., K] ->
    [..., N] in x's dtype. See reference/packed.py."""
    return _pick("linear_fp8_weight", backend, x, w)(x, w)


def linear_fp8_grouped(x: torch.Tensor, w, groups: int, *, backend: str | None = None) -> torch.Tensor:
    """Each of `groups` groups through its own rows of an Fp8BlockWeight (attention's wo_a): x [..., G, K], w
    [G * R, K] -> [..., G, R] in x's dtype. See reference/packed.py."""
    return _pick("linear_fp8_grouped", backend, x, w, groups)(x, w, groups)


def swiglu_fp8(x: torch.Tensor, w1, w3, limit: float, *, backend: str | None = None) -> torch.Tensor:
    """swiglu(x @ w1^T, x @ w3^T) over two Fp8BlockWeights [F, K] (the shared expert's gate and up, each rounded
    to x's dtype, clamped SwiGLU in fp32): [..., K] -> [..., F] in x's dtype. See reference/packed.py."""
    return _pick("swiglu_fp8", backend, x, w1, w3, limit)(x, w1, w3, limit)


def linear_fp4_weight(x: torch.Tensor, w, *, backend: str | None = None) -> torch.Tensor:
    """x @ w^T with w an Fp4GroupWeight (e2m1 [N, K] packed two per byte, 1x32 UE8M0 scales): [..., K] -> [..., N]
    in x's dtype. See reference/packed.py."""
    return _pick("linear_fp4_weight", backend, x, w)(x, w)


def linear_fp8_fp8(x: torch.Tensor, w, *, backend: str | None = None) -> torch.Tensor:
    """The FP8 x FP8 product: x quantised to e4m3 per 1x128 block (power-of-two scales) times the Fp8BlockWeight
    w, fp32 accumulation -> [..., N] in x's dtype. See reference/packed.py."""
    return _pick("linear_fp8_fp8", backend, x, w)(x, w)


def moe_experts_fp4(x: torch.Tensor, w1, w2, w3, idx: torch.Tensor, weights: torch.Tensor, swiglu_limit: float,
                    *, backend: str | None = None) -> torch.Tensor:
    """moe_experts over stacked Fp4GroupWeight experts (w1, w3 [E, F, C], w2 [E, C, F]) -> fp32 [N, C]."""
    return _pick("moe_experts_fp4", backend, x, w1, w2, w3, idx)(x, w1, w2, w3, idx, weights, swiglu_limit)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float, *, backend: str | None = None) -> torch.Tensor:
    """silu(min(gate, limit)) * clamp(up, -limit, limit) in fp32 math, gate's dtype (limit 0: no clamp)."""
    return _pick("swiglu", backend, gate)(gate, up, limit)
