"""Routed SwiGLU experts (docs/architecture.md#moe): a loop over experts, each on the tokens routed to it."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, limit)) * clamp(up, -limit, limit) in fp32; limit 0 disables the clamp."""
    gate, up = gate.float(), up.float()
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
    return F.silu(gate) * up


def weighted_swiglu(gate: torch.Tensor, up: torch.Tensor, weights: torch.Tensor, limit: float) -> torch.Tensor:
    """swiglu(gate, up) * weights[:, None] in gate.dtype (the grouped experts' hidden activation)."""
    return (swiglu(gate, up, limit) * weights.unsqueeze(-1).float()).to(gate.dtype)


def swiglu_expert(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, limit: float) -> torch.Tensor:
    """A dense SwiGLU expert (the shared expert) on every token: w1, w3 [F, C], w2 [C, F]; x.dtype matmuls."""
    h = swiglu(F.linear(x, w1.to(x.dtype)), F.linear(x, w3.to(x.dtype)), limit).to(x.dtype)
    return F.linear(h, w2.to(x.dtype))


def moe_experts(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, idx: torch.Tensor,
                weights: torch.Tensor, swiglu_limit: float) -> torch.Tensor:
    """y[n] = sum_j weights[n,j] * w2_e(swiglu(w1_e x[n], w3_e x[n])), e = idx[n,j]; fp32 [N, C].

    x: [N, C]; w1, w3: [E, F, C]; w2: [E, C, F]; idx: [N, k] int; weights: [N, k] fp32.
    The routing weight multiplies the hidden activation before w2, as the reference does. Matmuls run in
    x's dtype (bf16 activations meet bf16 copies of fp32 master weights, as autocast would give).
    """
    y = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = order[start:start + n]
        start += n
        tok = sel // idx.shape[1]
        xe = x[tok]
        h = swiglu(F.linear(xe, w1[e].to(x.dtype)), F.linear(xe, w3[e].to(x.dtype)), swiglu_limit)
        h = h * weights.flatten()[sel, None].float()
        y = y.index_add(0, tok, F.linear(h.to(x.dtype), w2[e].to(x.dtype)).float())
    return y
