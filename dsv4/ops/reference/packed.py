"""Matmuls over weights kept in the checkpoint's formats (dsv4.quant.packed): the spec the Triton kernels of
ops/triton/packed_linear.py and packed_experts.py are tested against. Each dequantises exactly (fp32) and
multiplies in fp32; results come back in the activation dtype.

The FP8 x FP8 product follows the official inference kernel's recipe: activations quantised to e4m3 per 1x128
block along K with a power-of-two (UE8M0) scale 2**ceil(log2(amax / 448)), products of e4m3 values accumulated
in fp32 and each block's sum scaled by both scales (docs/architecture.md#number-formats)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...quant.fake_quant import fp8_fake_quant
from ...quant.packed import Fp4GroupWeight, Fp8BlockWeight
from .experts import swiglu as _swiglu

ACT_BLOCK = 128  # activation values per FP8 scale in the FP8 x FP8 product


def linear_fp8_weight(x: torch.Tensor, w: Fp8BlockWeight) -> torch.Tensor:
    """x @ dequant(w)^T: x [..., K] (bf16/fp16/fp32), w FP8 [N, K] with 128x128 scales -> [..., N] in x.dtype."""
    return F.linear(x.float(), w.dequantize()).to(x.dtype)


def linear_fp8_grouped(x: torch.Tensor, w: Fp8BlockWeight, groups: int) -> torch.Tensor:
    """Each group through its own rows of w: x [..., G, K], w FP8 [G * R, K] -> [..., G, R] in x.dtype (attention's
    grouped output projection wo_a)."""
    wd = w.dequantize().view(groups, w.shape[0] // groups, w.shape[1])
    return torch.einsum("...gk,grk->...gr", x.float(), wd).to(x.dtype)


def linear_fp4_weight(x: torch.Tensor, w: Fp4GroupWeight) -> torch.Tensor:
    """x @ dequant(w)^T: x [..., K], w FP4 [N, K] (packed [N, K/2]) with 1x32 scales -> [..., N] in x.dtype."""
    return F.linear(x.float(), w.dequantize()).to(x.dtype)


def act_quant_fp8(x: torch.Tensor) -> torch.Tensor:
    """x's values after e4m3 quantisation per 1x128 block along K with power-of-two scales (same dtype; exact in
    bf16): what the FP8 x FP8 product multiplies."""
    return fp8_fake_quant(x, ACT_BLOCK)


def linear_fp8_fp8(x: torch.Tensor, w: Fp8BlockWeight) -> torch.Tensor:
    """The FP8 x FP8 product: act_quant_fp8(x) @ dequant(w)^T in fp32 -> [..., N] in x.dtype."""
    return F.linear(act_quant_fp8(x).float(), w.dequantize()).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """The experts' clamped SwiGLU (reference/experts.swiglu) in gate.dtype: the shared expert's activation
    between its FP8 projections."""
    return _swiglu(gate, up, limit).to(gate.dtype)


def swiglu_fp8(x: torch.Tensor, w1: Fp8BlockWeight, w3: Fp8BlockWeight, limit: float) -> torch.Tensor:
    """The shared expert's hidden activation over FP8 weights: swiglu(x @ w1^T, x @ w3^T) with both projections
    rounded to x.dtype first (two linear_fp8_weight calls) -> [..., F] in x.dtype."""
    return swiglu(linear_fp8_weight(x, w1), linear_fp8_weight(x, w3), limit)


def moe_experts_fp4(x: torch.Tensor, w1: Fp4GroupWeight, w2: Fp4GroupWeight, w3: Fp4GroupWeight, idx: torch.Tensor,
                    weights: torch.Tensor, swiglu_limit: float) -> torch.Tensor:
    """Routed SwiGLU experts over FP4 weights: the contract of reference/experts.moe_experts (fp32 [N, C]) with
    w1, w3 FP4 [E, F, C] and w2 FP4 [E, C, F]; only the experts some token uses are dequantised. The projections
    are rounded to x.dtype before the SwiGLU and the hidden activation before w2, as with bf16 weights."""
    k = idx.shape[1]
    y = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    flat = idx.flatten()
    for e in flat.unique().tolist():
        sel = (flat == e).nonzero().flatten()
        tok = sel // k
        xe = x[tok].float()
        g = F.linear(xe, w1[e].dequantize()).to(x.dtype)
        u = F.linear(xe, w3[e].dequantize()).to(x.dtype)
        h = (_swiglu(g, u, swiglu_limit) * weights.flatten()[sel, None].float()).to(x.dtype)
        y = y.index_add(0, tok, F.linear(h.float(), w2[e].dequantize()).to(x.dtype).float())
    return y
