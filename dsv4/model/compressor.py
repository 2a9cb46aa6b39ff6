"""The V4 compressor: m consecutive tokens -> one KV entry by softmax-gated pooling (docs/architecture.md#compressor).

Per token t: k_t = wkv(x_t), z_t = wgate(x_t) + ape[t mod m] (fp32). Non-overlapping (HCA): entry i pools
group i. Overlapping (CSA, coff = 2): the 2*Dc channels are [A | B]; entry i pools group i's B-half with
group (i-1)'s A-half, 2m candidates, stride m. Entries are normalised, roped at position i*m, and (with
the quantisation simulation on) FP8-rounded (main) or Hadamard+FP4-rounded (indexer).

`CompressorState` carries what crosses a chunk boundary: the unfinished group's tokens and, for
overlap, the last complete group. Rows of a batch may sit at different positions. With no state the
chunk starts at position 0 and its unfinished tail is dropped (a plain forward over whole sequences).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..cache.state import Compressed, CompressorState
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

        Without state every row starts at position 0. With state, `state` is updated in place.
        """
        B, S, _ = x.shape
        m, d = self.ratio, self.head_dim
        kv = ops.linear_fp32(x, self.wkv.weight)  # [B, S, coff*Dc]; compression runs in fp32 (scores are exponentiated)
        score = ops.linear_fp32(x, self.wgate.weight)
        if state is not None and S == 1:  # decode: position bias, state update, pooling, norm, rope: one op
            entries = ops.compress_step(kv[:, 0], score[:, 0], state.kv[:B], state.score[:B], pos0, m,
                                        self.overlap, self.norm.weight, self.norm.eps, freqs, x.dtype, self.ape)
            if quant_sim:
                entries = quantize_entries(entries, self.rope_dim, self.rotate)
            group, done = shared(pos0, ("decode_group", m), lambda: (pos0 // m, (pos0 % m == m - 1).unsqueeze(1)))
            return Compressed(entries.unsqueeze(1), group, done)
        if state is None:  # rows from position 0, groups aligned to them; the bias is added by phase in the op
            n, first_group, valid, prev, ape = S // m, torch.zeros_like(pos0), None, None, self.ape
        else:
            phase = shared(pos0, ("phase", S, m), lambda: (pos0.unsqueeze(1) + torch.arange(S, device=x.device)) % m)
            kv, score, n, valid, prev = self._with_state(kv, score + self.ape.float()[phase], pos0, state)
            first_group, ape = pos0 // m, None
        if n == 0:
            return Compressed(x.new_zeros(B, 0, d), first_group, valid[:, :0] if valid is not None else None)
        pooled = ops.compress_groups(kv, score, m, self.overlap, n, prev, ape)  # [B, n, Dc] fp32
        if valid is not None:  # groups a row has not completed pool only padding (NaN): zero them
            pooled = torch.where(valid.unsqueeze(-1), pooled, 0.0)
        entries = self.norm(pooled.to(x.dtype))
        starts = (first_group.unsqueeze(1) + torch.arange(n, device=x.device)) * m
        cos, sin = rope_angles(starts, freqs)                               # rope at each group's first token
        entries = apply_rope_(entries, cos, sin)
        if quant_sim:
            entries = quantize_entries(entries, self.rope_dim, self.rotate)
        return Compressed(entries, first_group, valid)

    def _with_state(self, kv: torch.Tensor, score: torch.Tensor, pos0: torch.Tensor, state: CompressorState):
        """Align each row's tokens to its group boundary (prepending the unfinished group kept in `state`),
        say which groups complete, and update `state` (previous group, new unfinished tail)."""
        B, S, width = kv.shape
        m, d = self.ratio, self.head_dim
        off = m if self.overlap else 0
        r0 = pos0 % m                                                      # tokens already pending per row
        L = S + m - 1
        j = torch.arange(m - 1, device=kv.device)
        keep = (j < r0.unsqueeze(1)).unsqueeze(-1)                          # [B, m-1, 1]
        buf_kv = torch.cat((torch.where(keep, state.kv[:B, off:off + m - 1], 0.0), kv.new_zeros(B, S, width)), 1)
        buf_sc = torch.cat((torch.where(keep, state.score[:B, off:off + m - 1], float("-inf")),
                            kv.new_full((B, S, width), float("-inf"))), 1)
        at = (r0.unsqueeze(1) + torch.arange(S, device=kv.device)).unsqueeze(-1).expand(-1, -1, width)
        buf_kv = buf_kv.scatter(1, at, kv)                                 # [B, L, width], group-aligned
        buf_sc = buf_sc.scatter(1, at, score)
        total = r0 + S
        n = L // m
        valid = (torch.arange(n, device=kv.device) + 1) * m <= total.unsqueeze(1)   # [B, n]
        prev = None
        if self.overlap:
            prev = state.kv[:B, :m, :d].clone(), state.score[:B, :m, :d].clone()
        # new state: the last complete group (overlap) and the tokens after it
        done = total // m                                                   # complete groups per row
        rest = total - done * m
        rows = torch.arange(m, device=kv.device)

        def take(buf: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
            idx = (start.unsqueeze(1) + rows).clamp(0, L - 1).unsqueeze(-1).expand(-1, -1, width)
            return buf.gather(1, idx)
        if self.overlap:
            has = (done > 0).view(B, 1, 1)
            state.kv[:B, :m] = torch.where(has, take(buf_kv, (done - 1) * m), state.kv[:B, :m])
            state.score[:B, :m] = torch.where(has, take(buf_sc, (done - 1) * m), state.score[:B, :m])
        live = (rows < rest.unsqueeze(1)).unsqueeze(-1)
        state.kv[:B, off:off + m] = torch.where(live, take(buf_kv, done * m), 0.0)
        state.score[:B, off:off + m] = torch.where(live, take(buf_sc, done * m), float("-inf"))
        return buf_kv, buf_sc, n, valid, prev


def quantize_entries(x: torch.Tensor, rope_dim: int, rotate: bool) -> torch.Tensor:
    """The reference's QAT round trip of a cached row: Hadamard + FP4 (indexer keys/queries, all dims),
    or FP8 on the nope dims only (attention KV; the rope dims stay in the activation dtype). Gradients pass
    straight through (quantisation-aware training)."""
    if rotate:
        x = hadamard(x)
        return straight_through(x, fp4_fake_quant(x, 32))
    q = torch.cat((fp8_fake_quant(x[..., :-rope_dim], 64), x[..., -rope_dim:]), dim=-1)
    return straight_through(x, q)
