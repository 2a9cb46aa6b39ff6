"""The V4 compressor: m consecutive tokens -> one KV entry by softmax-gated pooling (v4-architecture §3.4).

Per token t: k_t = wkv(x_t), z_t = wgate(x_t) + ape[t mod m] (fp32). Non-overlapping (HCA): entry i pools
group i. Overlapping (CSA, coff = 2): the 2*Dc channels are [A | B]; entry i pools group i's B-half with
group (i-1)'s A-half, 2m candidates, stride m. Entries are normalised, roped at position i*m, and (with
the quantisation simulation on) FP8-rounded (main) or Hadamard+FP4-rounded (indexer).

`CompressorState` carries what crosses a chunk boundary: the unfinished group's tokens and, for
overlap, the last complete group. With no state the chunk must start at position 0 and its unfinished
tail is dropped (a plain forward over a whole sequence).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..quant import fp4_fake_quant, fp8_fake_quant, hadamard
from .norm import RMSNorm
from .rope import apply_rope, rope_angles


@dataclass
class CompressorState:
    """fp32 buffers [B, coff*m, coff*Dc] in the reference layout: with overlap, rows 0..m-1 hold the previous
    complete group and rows m..2m-1 the unfinished one; without, rows 0..m-1 hold the unfinished group.
    Scores already include `ape`; empty rows have kv 0 and score -inf."""
    kv: torch.Tensor
    score: torch.Tensor

    @classmethod
    def empty(cls, batch: int, ratio: int, width: int, overlap: bool, device=None) -> "CompressorState":
        rows = ratio * (2 if overlap else 1)
        return cls(torch.zeros(batch, rows, width, device=device),
                   torch.full((batch, rows, width), float("-inf"), device=device))


class Compressor(nn.Module):
    def __init__(self, dim: int, head_dim: int, rope_dim: int, ratio: int, overlap: bool, rotate: bool,
                 eps: float):
        super().__init__()
        self.head_dim, self.rope_dim, self.ratio = head_dim, rope_dim, ratio
        self.overlap, self.rotate = overlap, rotate
        coff = 2 if overlap else 1
        self.wkv = nn.Linear(dim, coff * head_dim, bias=False)
        self.wgate = nn.Linear(dim, coff * head_dim, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * head_dim))
        self.norm = RMSNorm(head_dim, eps)

    def forward(self, x: torch.Tensor, start_pos: int, freqs: torch.Tensor, quant_sim: bool,
                state: CompressorState | None = None) -> torch.Tensor:
        """x: [B, S, C] (attn_norm output) for positions start_pos.. -> the entries completed here [B, n, Dc].

        Updates `state` in place (when given). Entry g of the output covers group start_pos // m + g.
        """
        B, S, _ = x.shape
        m, d = self.ratio, self.head_dim
        pos = start_pos + torch.arange(S, device=x.device)
        xf = x.float()  # compression runs in fp32 (scores are exponentiated)
        kv = F.linear(xf, self.wkv.weight.float())                          # [B, S, coff*Dc]
        score = F.linear(xf, self.wgate.weight.float()) + self.ape.float()[pos % m]
        pending = start_pos % m
        if state is None:
            if pending:
                raise ValueError(f"a compressor without state must start at a group boundary, got {start_pos}")
        else:  # prepend the unfinished group's tokens kept from earlier chunks
            off = m if self.overlap else 0
            kv = torch.cat((state.kv[:B, off:off + pending], kv), dim=1)
            score = torch.cat((state.score[:B, off:off + pending], score), dim=1)
        n = kv.shape[1] // m
        first_group = start_pos // m
        prev = None  # group (first_group - 1), whose A-half the first new entry pools (overlap only)
        if self.overlap and state is not None and first_group > 0:
            prev = state.kv[:B, :m, :d].clone(), state.score[:B, :m, :d].clone()
        if state is not None:
            self._update_state(state, kv, score, n)
        if n == 0:
            return x.new_zeros(B, 0, d)
        groups_kv = kv[:, :n * m].unflatten(1, (n, m))                     # [B, n, m, coff*Dc]
        groups_sc = score[:, :n * m].unflatten(1, (n, m))
        if self.overlap:
            if prev is not None:
                prev_kv, prev_sc = prev
            else:
                prev_kv = kv.new_zeros(B, m, d)
                prev_sc = kv.new_full((B, m, d), float("-inf"))
            # candidates of entry i: group i-1's A-half (rows 0..m-1), then group i's B-half (rows m..2m-1)
            a_kv = torch.cat((prev_kv.unsqueeze(1), groups_kv[:, :-1, :, :d]), dim=1)
            a_sc = torch.cat((prev_sc.unsqueeze(1), groups_sc[:, :-1, :, :d]), dim=1)
            cand_kv = torch.cat((a_kv, groups_kv[..., d:]), dim=2)
            cand_sc = torch.cat((a_sc, groups_sc[..., d:]), dim=2)
        else:
            cand_kv, cand_sc = groups_kv, groups_sc
        pooled = ops.compress_pool(cand_kv, cand_sc)                       # [B, n, Dc] fp32
        entries = self.norm(pooled.to(x.dtype))
        cos, sin = rope_angles((first_group + torch.arange(n, device=x.device)) * m, freqs)
        entries = apply_rope(entries, cos.unsqueeze(0), sin.unsqueeze(0))
        if quant_sim:
            entries = quantize_entries(entries, self.rope_dim, self.rotate)
        return entries

    def _update_state(self, state: CompressorState, kv: torch.Tensor, score: torch.Tensor, n: int) -> None:
        B, m = kv.shape[0], self.ratio
        off = m if self.overlap else 0
        if self.overlap and n > 0:  # the last complete group becomes the "previous" rows
            state.kv[:B, :m] = kv[:, (n - 1) * m:n * m]
            state.score[:B, :m] = score[:, (n - 1) * m:n * m]
        rest = kv.shape[1] - n * m
        state.kv[:B, off:off + m] = 0
        state.score[:B, off:off + m] = float("-inf")
        state.kv[:B, off:off + rest] = kv[:, n * m:]
        state.score[:B, off:off + rest] = score[:, n * m:]


def quantize_entries(x: torch.Tensor, rope_dim: int, rotate: bool) -> torch.Tensor:
    """The reference's QAT round trip of a cached row: Hadamard + FP4 (indexer keys/queries, all dims),
    or FP8 on the nope dims only (attention KV; the rope dims stay in the activation dtype)."""
    if rotate:
        return fp4_fake_quant(hadamard(x), 32)
    return torch.cat((fp8_fake_quant(x[..., :-rope_dim], 64), x[..., -rope_dim:]), dim=-1)
