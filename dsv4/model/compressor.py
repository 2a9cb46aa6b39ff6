"""The V4 compressor: m consecutive tokens -> one KV entry by softmax-gated pooling (docs/architecture.md#compressor).

Per token t: k_t = wkv(x_t), z_t = wgate(x_t) + ape[t mod m] (fp32). Non-overlapping (HCA): entry i pools
group i. Overlapping (CSA, coff = 2): the 2*Dc channels are [A | B]; entry i pools group i's B-half with
group (i-1)'s A-half, 2m candidates, stride m. Entries are normalised, roped at position i*m, and (with
the quantisation simulation on) FP8-rounded (main) or Hadamard+FP4-rounded (indexer).

`CompressorState` carries what crosses a chunk boundary: the unfinished group's tokens and, for
overlap, the last complete group. Rows of a batch may sit at different positions. With no state the
chunk starts at a group boundary pos0 (0 for a plain forward over whole sequences; a piece's first group under
context parallelism) and its unfinished tail is dropped.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..cache.state import Compressed, CompressorState, absorb
from ..cache.step_memo import shared
from ..quant import fp4_fake_quant, fp8_fake_quant, hadamard, straight_through
from .norm import Linear, RMSNorm
from .rope import apply_rope_, rope_angles


class Compressor(nn.Module):
    def __init__(self, dim: int, head_dim: int, rope_dim: int, ratio: int, overlap: bool, rotate: bool,
                 eps: float):
        super().__init__()
        self.head_dim, self.rope_dim, self.ratio = head_dim, rope_dim, ratio
        self.overlap, self.rotate = overlap, rotate
        coff = 2 if overlap else 1
        self.wkv = Linear(dim, coff * head_dim, bias=False)
        self.wgate = Linear(dim, coff * head_dim, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * head_dim))
        self.norm = RMSNorm(head_dim, eps)

    def forward(self, x: torch.Tensor, pos0: torch.Tensor, freqs: torch.Tensor, quant_sim: bool,
                state: CompressorState | None = None) -> Compressed:
        """x: [B, S, C] (attn_norm output), row b at positions pos0[b].. -> the groups this chunk completes.

        Without state every row starts at pos0[b], a multiple of the ratio (the overlapping compressor's first
        group then has no previous group). With state, `state` is updated in place.
        """
        B, S, _ = x.shape
        m, d = self.ratio, self.head_dim
        kv = ops.linear_fp32(x, self.wkv.weight)  # [B, S, coff*Dc]; compression runs in fp32 (scores are exponentiated)
        score = ops.linear_fp32(x, self.wgate.weight)
        if state is not None and state.journal is not None:  # a cache checkpoint is open: keep the token rows
            state.record(kv, score, self.ape)
            if 1 < S <= STEPWISE_MAX:
                return self._stepwise(kv, score, pos0, freqs, quant_sim, state, x.dtype)
        if state is not None and S == 1:  # decode: position bias, state update, pooling, norm, rope: one op
            entries = ops.compress_step(kv[:, 0], score[:, 0], state.kv[:B], state.score[:B], pos0, m,
                                        self.overlap, self.norm.weight, self.norm.eps, freqs, x.dtype, self.ape)
            if quant_sim:
                entries = quantize_entries(entries, self.rope_dim, self.rotate)
            group, done = shared(pos0, ("decode_group", m), lambda: (pos0 // m, (pos0 % m == m - 1).unsqueeze(1)))
            return Compressed(entries.unsqueeze(1), group, done)
        if state is None:  # rows from a group boundary, groups aligned to them; the bias is added by phase in the op
            n, first_group, valid, prev, ape = S // m, pos0 // m, None, None, self.ape
        else:
            phase = shared(pos0, ("phase", S, m), lambda: (pos0.unsqueeze(1) + torch.arange(S, device=x.device)) % m)
            kv, score, n, valid, prev = absorb(state, kv, score + self.ape.float()[phase], pos0, m, self.overlap)
            first_group, ape = shared(pos0, ("first_group", m), lambda: pos0 // m), None
        if n == 0:
            return Compressed(x.new_zeros(B, 0, d), first_group, valid[:, :0] if valid is not None else None)
        pooled = ops.compress_groups(kv, score, m, self.overlap, n, prev, ape)  # [B, n, Dc] fp32
        if valid is not None:  # groups a row has not completed pool only padding (NaN): zero them
            pooled = torch.where(valid.unsqueeze(-1), pooled, 0.0)
        entries = self.norm(pooled.to(x.dtype))
        # rope at each group's first token (alike for the main and the indexer compressor of a layer in a step)
        cos, sin = shared(first_group, ("group_rope", m, n, freqs.data_ptr()), lambda: rope_angles(
            (first_group.unsqueeze(1) + torch.arange(n, device=x.device)) * m, freqs))
        entries = apply_rope_(entries, cos, sin)
        if quant_sim:
            entries = quantize_entries(entries, self.rope_dim, self.rotate)
        return Compressed(entries, first_group, valid)

    def _stepwise(self, kv: torch.Tensor, score: torch.Tensor, pos0: torch.Tensor, freqs: torch.Tensor,
                  quant_sim: bool, state: CompressorState, dtype: torch.dtype) -> Compressed:
        """A short step inside a cache checkpoint (a speculative verify) token by token through the decode's fused
        op (`compress_steps`: on a GPU the decode's kernels, S + 1 launches per compressor) instead of the chunk
        path's state alignment, pooling, norm and rope (dozens of kernels), and the state and entries plain decoding
        of those tokens would leave. Every token's output goes to the cache, at its group's row, valid where the
        token completes the group (no gather of the completing tokens: the masked write sends the rest to the
        scratch row)."""
        B, S, _ = kv.shape
        m = self.ratio
        out = ops.compress_steps(kv, score, state.kv[:B], state.score[:B], pos0, m, self.overlap, self.norm.weight,
                                 self.norm.eps, freqs, dtype, self.ape)   # [B, S, d]: token t's group's entry
        if quant_sim:
            out = quantize_entries(out, self.rope_dim, self.rotate)

        def groups() -> tuple[torch.Tensor, torch.Tensor]:   # each token's group, and whether it completes it
            p = shared(pos0, ("pos", S), lambda: pos0.unsqueeze(1) + torch.arange(S, device=pos0.device))   # [B, S]
            return p // m, p % m == m - 1
        rows, valid = shared(pos0, ("token_groups", m, S), groups)
        return Compressed(out, rows[:, 0], valid, rows)


STEPWISE_MAX = 4   # steps inside a cache checkpoint up to this many tokens run token by token (Compressor._stepwise;
#                    on a GPU S + 1 kernels against ~35 for the chunk path: 1 disables it)


def quantize_entries(x: torch.Tensor, rope_dim: int, rotate: bool) -> torch.Tensor:
    """The reference's QAT round trip of a cached row: Hadamard + FP4 (indexer keys/queries, all dims),
    or FP8 on the nope dims only (attention KV; the rope dims stay in the activation dtype). Gradients pass
    straight through (quantisation-aware training)."""
    if rotate:
        x = hadamard(x)
        return straight_through(x, fp4_fake_quant(x, 32))
    q = torch.cat((fp8_fake_quant(x[..., :-rope_dim], 64), x[..., -rope_dim:]), dim=-1)
    return straight_through(x, q)
