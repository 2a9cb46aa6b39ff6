"""DeepSeekMoE as V4 computes it (docs/architecture.md#moe): one shared expert plus top-k routed experts.

Affinities s = sqrt(softplus(x W^T)) in fp32. Selection: top-k of s + bias (the aux-loss-free balancing
bias steers selection only), or a fixed token-id -> experts table in the first `n_hash_layers` layers.
Routing weights: the selected s, normalised to sum 1, times `route_scale`. Experts are SwiGLU with
the gate clamped above and the up projection clamped both ways at `swiglu_limit`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import ops
from .norm import Linear
from ..quant import fp4_fake_quant, straight_through
from ..quant.packed import FP4_GROUP, Fp4GroupWeight


def _local(w: torch.Tensor) -> torch.Tensor:
    """The locally held part of a parameter (a sharded DTensor's shard, or the tensor itself)."""
    return w.to_local() if hasattr(w, "to_local") else w


def fp4_weights(w: torch.Tensor) -> torch.Tensor:
    """Expert weights as the FP4 checkpoint stores them (e2m1, one power-of-two scale per 32 inputs), with the
    gradient passed straight to the full-precision master weight (V4's FP4 QAT)."""
    return straight_through(w, fp4_fake_quant(w, 32))


class Gate(nn.Module):
    def __init__(self, dim: int, n_experts: int, topk: int, route_scale: float, vocab_size: int, hashed: bool):
        super().__init__()
        self.topk, self.route_scale, self.hashed = topk, route_scale, hashed
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(vocab_size, topk, dtype=torch.long))
        else:
            self.bias = nn.Parameter(torch.zeros(n_experts), requires_grad=False)  # nudged, not trained
        # routing replay (dsv4.posttrain.routing_replay), both off by default: `record` receives each forward's
        # expert ids [N, k]; `replay` [N, k] gives the ids to use (-1: choose as usual). The weights still come
        # from this forward's affinities of the given experts, so the gate keeps its gradient.
        self.record: Callable[[torch.Tensor], None] | None = None
        self.replay: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, C] -> (routing weights [N, k] fp32, expert ids [N, k], affinities [N, E])."""
        fixed = None
        if self.hashed:
            if token_ids is None:
                raise ValueError("hash-routed MoE layers need the token ids")
            fixed = self.tid2eid[token_ids.flatten()]
        logits = ops.linear_fp32(x, self.weight)
        out = ops.moe_route(logits, None if self.hashed else self.bias, fixed, self.topk, self.route_scale)
        if self.replay is not None and not self.hashed:
            if self.replay.shape != out[1].shape:
                raise ValueError(f"routing replay gives expert ids of shape {tuple(self.replay.shape)} for a "
                                 f"forward routing {tuple(out[1].shape)}")
            given = torch.where(self.replay >= 0, self.replay, out[1])
            out = ops.moe_route(logits, None, given, self.topk, self.route_scale)
        if self.record is not None:
            self.record(out[1].detach())
        return out


class Expert(nn.Module):
    """The shared expert (w1 gate, w3 up, w2 down)."""

    def __init__(self, dim: int, inter_dim: int, swiglu_limit: float):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, bias=False)
        self.w2 = Linear(inter_dim, dim, bias=False)
        self.w3 = Linear(dim, inter_dim, bias=False)
        self.swiglu_limit = swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w1.packed is not None:  # FP8 weights (native checkpoint): gate+up+SwiGLU in one op, then down
            return self.w2(ops.swiglu_fp8(x, self.w1.packed, self.w3.packed, self.swiglu_limit))
        return ops.swiglu_expert(x, self.w1.weight, self.w2.weight, self.w3.weight, self.swiglu_limit)


class RoutedExperts(nn.Module):
    """All routed experts stacked ([E, F, C] / [E, C, F]) so they can run as one grouped GEMM and be
    orthogonalised in one batched call; the checkpoint's per-expert tensors map onto slices. After `pack_fp4`
    (inference on an FP4 checkpoint) they are held as the checkpoint's bytes instead: buffers `w1_q`, `w1_s`, ...
    (e2m1 packed [E, F, C/2], UE8M0 [E, F, C/32])."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))

    def pack_fp4(self) -> None:
        """Replace the three weight stacks by empty FP4 buffers on their device, for the loader to fill."""
        for name in ("w1", "w2", "w3"):
            w = getattr(self, name)
            E, N, K = w.shape
            if K % FP4_GROUP:
                raise ValueError(f"pack_fp4: experts.{name} has K={K}, not a multiple of {FP4_GROUP}")
            delattr(self, name)
            self.register_buffer(f"{name}_q", torch.empty(E, N, K // 2, dtype=torch.uint8, device=w.device))
            self.register_buffer(f"{name}_s", torch.empty(E, N, K // FP4_GROUP, dtype=torch.uint8, device=w.device))

    @property
    def packed(self) -> tuple[Fp4GroupWeight, Fp4GroupWeight, Fp4GroupWeight] | None:
        """(w1, w2, w3) as FP4 weights after pack_fp4, else None."""
        if "w1_q" not in self._buffers:
            return None
        return tuple(Fp4GroupWeight(self._buffers[f"{n}_q"], self._buffers[f"{n}_s"]) for n in ("w1", "w2", "w3"))


class MoE(nn.Module):
    def __init__(self, layer_id: int, cfg) -> None:
        super().__init__()
        self.swiglu_limit = cfg.swiglu_limit
        self.gate = Gate(cfg.dim, cfg.n_routed_experts, cfg.n_activated_experts, cfg.route_scale,
                         cfg.vocab_size, hashed=cfg.is_hash_layer(layer_id))
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
        self.shared_experts = Expert(cfg.dim, cfg.moe_inter_dim, cfg.swiglu_limit)
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None  # (expert ids, affinities), for training
        self.qat = False  # FP4 (MXFP4, 1x32) fake quantisation of the routed experts with a straight-through grad
        # placement hook (dsv4.distributed): computes the routed sum when the experts live on several ranks
        self.dispatch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def routed(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
               expert_offset: int = 0) -> torch.Tensor:
        """The routed experts this module holds, for tokens whose expert ids are local (global id - offset)."""
        e = self.experts
        local = idx - expert_offset if expert_offset else idx  # (a subtraction of 0 is one more kernel per step)
        packed = e.packed
        if packed is not None:  # the checkpoint's FP4 bytes, dequantised inside the GEMMs
            return ops.moe_experts_fp4(x, *packed, local, weights, self.swiglu_limit)
        w1, w2, w3 = (fp4_weights(_local(w)) if self.qat else _local(w) for w in (e.w1, e.w2, e.w3))
        if x.is_cuda and x.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
            # fp32 activations under autocast meet the experts in the autocast dtype, as every other projection
            # does: bf16 grouped GEMMs rather than the reference's fp32 per-expert loop (which syncs with the host)
            x = x.to(torch.get_autocast_dtype("cuda"))
        return ops.moe_experts(x, w1, w2, w3, local, weights, self.swiglu_limit)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor:
        """x: [B, S, C] (ffn_norm output) -> [B, S, C]."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx, scores = self.gate(flat, token_ids)
        self.last_routing = (idx, scores)
        y = (self.dispatch or self.routed)(flat, idx, weights)                   # fp32
        shared = self.shared_experts(flat)
        # the same fp32 sum; without autograd in place (one kernel instead of a widening copy and an add)
        y = y + shared.float() if torch.is_grad_enabled() else y.add_(shared)
        return y.to(x.dtype).view(shape)
