"""The lightning indexer (docs/architecture.md#lightning-indexer): scores of the compressed entries for each
query, and their top-k as the attention's index list."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ...quant.records import decode_fp4_keys
from .sparse_attn import query_chunks


def index_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """I[b,s,t] = sum_h weights[b,s,h] * relu(q[b,s,h] . keys[b,t]) in fp32.

    q: [B, S, Hi, Di]; weights: [B, S, Hi] (already scaled by Di^-0.5 * Hi^-0.5); keys: [B, T, Di].
    Queries run in chunks so the per-head products [chunk, Hi, T] stay bounded; under autograd each chunk
    is checkpointed (recomputed in backward), so a long sequence never holds [S, Hi, T] at once.
    """
    out = []
    for sl in query_chunks(q.shape[1], q.shape[2] * keys.shape[1]):
        args = (q[:, sl], weights[:, sl], keys)
        if torch.is_grad_enabled() and sl.stop - sl.start < q.shape[1]:
            out.append(checkpoint(_index_scores, *args, use_reentrant=False))
        else:
            out.append(_index_scores(*args))
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def _index_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    dots = torch.einsum("bshd,btd->bsht", q.float(), keys.float())
    return torch.einsum("bsht,bsh->bst", dots.relu(), weights.float())


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, n_visible: torch.Tensor,
                 k: int, prefix: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """Indices of the top-k indexer scores among keys[:, :n_visible[b,s]], -1 where fewer are visible.
    Equal scores are broken towards the lower index.

    n_visible: [B, S] int (a compressed entry j is visible to the query iff j < n_visible).
    keys may also be the cache's FP4 records (uint8 [B, T, Di/2 + Di/32]), dequantised to q.dtype here.
    Returns [B, S, min(k, T)] int64; with `prefix` [B, S, P], the attention's index list instead:
    [prefix | selected entries + offset (-1 stays -1)] [B, S, P + min(k, T)].
    """
    top = _indexer_topk(q, weights, keys, n_visible, k)
    return top if prefix is None else _with_prefix(top, prefix, offset)


def _with_prefix(top: torch.Tensor, prefix: torch.Tensor, offset: int) -> torch.Tensor:
    """[prefix | top + offset where top >= 0, else -1] along the last dim (int64)."""
    return torch.cat((prefix.long(), torch.where(top >= 0, top + offset, -1)), dim=-1)


def _indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, n_visible: torch.Tensor,
                  k: int) -> torch.Tensor:
    B, S = q.shape[:2]
    if keys.dtype == torch.uint8:
        keys = decode_fp4_keys(keys, q.shape[-1], q.dtype)
    T = keys.shape[1]
    k = min(k, T)
    if k == 0:
        return torch.empty(B, S, 0, dtype=torch.long, device=q.device)
    cols = torch.arange(T, device=q.device)
    out = []
    for sl in query_chunks(S, T * q.shape[2]):
        scores = index_scores(q[:, sl], weights[:, sl], keys)              # [B, s, T]
        hidden = cols >= n_visible[:, sl].unsqueeze(-1)
        # a stable sort breaks ties (e.g. all-zero ReLU scores) towards the older entry, so the choice
        # never depends on how many entries exist beyond those visible
        top = scores.masked_fill(hidden, float("-inf")).sort(dim=-1, descending=True, stable=True).indices[..., :k]
        out.append(torch.where(top >= n_visible[:, sl].unsqueeze(-1), -1, top))
    return torch.cat(out, dim=1)
