"""MoE routing in one kernel (forward only, inference): affinities sqrt(softplus), biased top-k by repeated
argmax (k is small), weight gather and normalisation. The eager form is ~10 kernels per layer and token batch;
ties go to the lower expert id."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(logit_ptr, bias_ptr, fixed_ptr, w_ptr, idx_ptr, s_ptr, N, E, route_scale,
                  K: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr, BLOCK_N: tl.constexpr, FIXED: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < N
    es = tl.arange(0, EP)
    m = rm[:, None] & (es[None, :] < E)
    x = tl.load(logit_ptr + rows[:, None] * E + es[None, :], mask=m, other=0.0)
    e = tl.exp(x)
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))   # accurate log(1 + e) for small e
    s = tl.sqrt(tl.where(x > 20.0, x, log1p))                    # torch's softplus threshold
    tl.store(s_ptr + rows[:, None] * E + es[None, :], s, mask=m)
    ks = tl.arange(0, KP)
    w = tl.zeros([BLOCK_N, KP], tl.float32)
    ids = tl.zeros([BLOCK_N, KP], tl.int64)
    if FIXED:
        ids = tl.load(fixed_ptr + rows[:, None] * K + ks[None, :], mask=rm[:, None] & (ks[None, :] < K), other=0)
        for j in tl.static_range(K):
            sel = tl.sum(tl.where(ks[None, :] == j, ids, 0), 1)
            w = tl.where(ks[None, :] == j, tl.sum(tl.where(es[None, :] == sel[:, None], s, 0.0), 1)[:, None], w)
    else:
        cand = tl.where(m, s + tl.load(bias_ptr + es, mask=es < E, other=0.0)[None, :], float("-inf"))
        for j in tl.static_range(K):
            sel = tl.argmax(cand, 1)
            hit = es[None, :] == sel[:, None]
            w = tl.where(ks[None, :] == j, tl.sum(tl.where(hit, s, 0.0), 1)[:, None], w)
            ids = tl.where(ks[None, :] == j, sel[:, None].to(tl.int64), ids)
            cand = tl.where(hit, float("-inf"), cand)
    w = w / tl.sum(w, 1)[:, None] * route_scale
    km = rm[:, None] & (ks[None, :] < K)
    tl.store(w_ptr + rows[:, None] * K + ks[None, :], w, mask=km)
    tl.store(idx_ptr + rows[:, None] * K + ks[None, :], ids, mask=km)


def moe_route(logits: torch.Tensor, bias: torch.Tensor | None, fixed_idx: torch.Tensor | None, k: int,
              route_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ops.reference.routing.moe_route."""
    logits = logits.float().contiguous()
    N, E = logits.shape
    s = torch.empty_like(logits)
    w = torch.empty(N, k, dtype=torch.float32, device=logits.device)
    idx = torch.empty(N, k, dtype=torch.int64, device=logits.device)
    fixed = fixed_idx.to(torch.int64).contiguous() if fixed_idx is not None else idx
    b = bias.float().contiguous() if bias is not None else logits
    block = 16
    _route_kernel[(triton.cdiv(N, block),)](logits, b, fixed, w, idx, s, N, E, float(route_scale), K=k,
                                            KP=triton.next_power_of_2(k), EP=triton.next_power_of_2(E),
                                            BLOCK_N=block, FIXED=fixed_idx is not None, num_warps=4)
    return w, (fixed_idx if fixed_idx is not None else idx), s


def supports(logits: torch.Tensor, *args) -> bool:
    return (logits.is_cuda and logits.dim() == 2 and logits.shape[1] <= 1024 and logits.shape[0] > 0
            and not (torch.is_grad_enabled() and logits.requires_grad))
