"""Sparse attention over index lists (docs/architecture.md#sparse-attention).

One op serves window-only, CSA and HCA layers: the caller lists, per query, which rows of a shared
K=V tensor it sees (window rows and compressed rows alike); -1 marks an unused slot.
"""
from __future__ import annotations

import torch

from ...quant.records import decode_fp8_kv

# Queries are processed in chunks so the gathered [chunk, K, D] keys stay around this many elements.
CHUNK_ELEMENTS = 1 << 24


def query_chunks(n_queries: int, per_query: int):
    """Slices of the queries, each holding about CHUNK_ELEMENTS gathered values (per_query per query)."""
    step = max(1, CHUNK_ELEMENTS // max(per_query, 1))
    for s in range(0, n_queries, step):
        yield slice(s, min(s + step, n_queries))


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor,
                scale: float, entries: torch.Tensor | None = None, rope_dim: int = 0) -> torch.Tensor:
    """Attention of each query over the K=V rows it indexes, with a per-head sink in the softmax.

    q: [B, S, H, D]; kv: [B, N, D] (one shared head, used as key and value); sink: [H] fp32 logits;
    idx: [B, S, K] int, rows of kv, -1 = masked. Returns [B, S, H, D] in q.dtype.
    o = sum_j e^{s_j} v_j / (sum_j e^{s_j} + e^{sink_h}),  s_j = scale * q . k_j   (fp32 math).
    entries: optional second source of rows N..N+n-1 after kv, [B, n, D] floats or uint8 FP8 serving records
    [B, n, record] (rope_dim bf16 rope values) dequantised to q.dtype (kernels read both in place: the cached
    compressed entries need no copy next to the window rows).
    """
    B, S, H, D = q.shape
    if entries is not None:
        more = decode_fp8_kv(entries, D, rope_dim, q.dtype) if entries.dtype == torch.uint8 else entries
        kv = torch.cat((kv.to(q.dtype), more.to(q.dtype)), 1)
    out = []
    for sl in query_chunks(S, idx.shape[-1] * D):
        ix = idx[:, sl]                                                    # [B, s, K]
        valid = ix >= 0
        rows = torch.gather(kv.float(), 1, ix.clamp(min=0).flatten(1).unsqueeze(-1).expand(-1, -1, D))
        rows = rows.view(B, ix.shape[1], ix.shape[2], D)                   # [B, s, K, D]
        scores = torch.einsum("bshd,bskd->bshk", q[:, sl].float(), rows) * scale
        scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
        sinks = sink.float().view(1, 1, H, 1).expand(B, ix.shape[1], H, 1)
        probs = torch.softmax(torch.cat((scores, sinks), dim=-1), dim=-1)[..., :-1]
        out.append(torch.einsum("bshk,bskd->bshd", probs, rows))
    return torch.cat(out, dim=1).to(q.dtype)
