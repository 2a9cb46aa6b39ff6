"""The lightning indexer of CSA layers (docs/architecture.md#lightning-indexer): picks, per query, the top-k compressed
entries by  I(s, j) = sum_h w_h(s) * ReLU(q_h(s) . K_j)  over the entries visible to s.

It owns a compressor of its own (Dc = index_head_dim) and reuses the attention's low-rank query latent.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import ops
from .compressor import Compressor, quantize_entries
from .context import LocalPieces
from .norm import Linear
from .rope import apply_rope_


class Indexer(nn.Module):
    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, rope_dim: int, ratio: int,
                 topk: int, eps: float):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim, self.topk = n_heads, head_dim, rope_dim, topk
        self.wq_b = Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.weights_proj = Linear(dim, n_heads, bias=False)
        self.compressor = Compressor(dim, head_dim, rope_dim, ratio, overlap=True, rotate=True, eps=eps)
        self.fp4 = False  # Hadamard + FP4 round trip of queries and keys (QAT, and the reference's inference)
        # routing replay (dsv4.posttrain.routing_replay), both off by default: `record` receives each cached
        # step's selected entry ids [B, S, <=k] (-1 pads); `replay` = (entry ids [B, S, k] with -1 pads, known
        # [B, S] bool) replaces the top-k of whole-sequence forwards where known (Attention._sequence reads it)
        self.record: Callable[[torch.Tensor], None] | None = None
        self.replay: tuple[torch.Tensor, torch.Tensor] | None = None

    def queries(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indexer queries [B, S, Hi, Di] and head weights [B, S, Hi] (fp32, scaled by Di^-0.5 * Hi^-0.5)."""
        B, S, _ = x.shape
        q = apply_rope_(self.wq_b(qr).view(B, S, self.n_heads, self.head_dim), cos, sin)
        if self.fp4:
            q = quantize_entries(q, self.rope_dim, rotate=True)
        w = self.weights_proj(x).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        return q, w

    def forward(self, x: torch.Tensor, qr: torch.Tensor, pos0: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                freqs: torch.Tensor, n_visible: torch.Tensor, cache=None, prefix: torch.Tensor | None = None,
                offset: int = 0) -> torch.Tensor:
        """Top-k entry indices [B, S, k] (-1 pads) among the entries each query sees (n_visible [B, S]); with
        `prefix`, the attention's index list [prefix | entries + offset] (see ops.indexer_topk)."""
        new = self.compressor(x, pos0, freqs, self.fp4, cache.indexer_state if cache is not None else None)
        if cache is None:
            keys = new.entries
        else:
            cache.add_keys(new)
            keys = cache.keys()
        q, w = self.queries(x, qr, cos, sin)
        out = ops.indexer_topk(q, w, keys, n_visible, self.topk, prefix, offset)
        if self.record is not None:
            top = out if prefix is None else out[..., prefix.shape[-1]:]
            self.record(top if prefix is None or not offset else torch.where(top >= 0, top - offset, -1))
        return out

    def sequence_scores(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        freqs: torch.Tensor, pieces: LocalPieces | None = None) -> torch.Tensor:
        """Scores I[b, s, j] of every query against every compressed entry of whole sequences (position 0..);
        with `pieces` (context parallelism), of this process's queries against the whole sequences' keys."""
        if pieces is None:
            zeros = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            keys = self.compressor(x, zeros, freqs, self.fp4).entries
        else:
            keys = pieces.entries(self.compressor, x, freqs, self.fp4)
        q, w = self.queries(x, qr, cos, sin)
        return ops.index_scores(q, w, keys)
