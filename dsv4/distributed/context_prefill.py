"""Inference prefill through context parallelism: a long prompt's forward split across the ranks of a
ContextParallel group, leaving on every rank the cache a one-process prefill leaves, so each can decode on.

Each rank runs the whole-sequence context-parallel forward of its chunks (the attention, the part that grows with
the prompt, is split as in training). The cache is filled layer by layer as the forward reaches it: the layer's
attention inputs are all-gathered and every rank writes the window rows, compressed entries, indexer keys and
compressor states of the whole prompt (Attention.fill_cache: projections and compressors only, no attention).
So each rank holds one layer's [B, T, dim] inputs at a time and repeats the compressors' work on the whole prompt.

    logits = context_parallel_prefill(model, prompt, cache, ContextParallel())   # every rank: the same prompt
    model(next_tokens, cache=cache)                                               # then decode, on any rank
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..cache import KVCache
from ..model import Transformer
from .context_parallel import ContextParallel

__all__ = ["context_parallel_prefill"]


@torch.no_grad()
def context_parallel_prefill(model: Transformer, tokens: torch.Tensor, cache: KVCache,
                             cp: ContextParallel) -> torch.Tensor:
    """Prefill the prompts `tokens` [B, T] (the same on every rank of cp's group) into the empty `cache` (every
    rank's own) through context parallelism. Returns the last position's fp32 logits [B, 1, vocab] on every rank.
    The model is left with the sequence context it had."""
    B, T = tokens.shape
    if cache.mtp or any(cache.lengths()):
        raise ValueError(f"context-parallel prefill starts empty main-model caches from position 0, got row lengths "
                         f"{cache.lengths()}{' (an MTP cache)' if cache.mtp else ''}")
    kept = model.sequence_context
    model.set_sequence_context(cp)
    at = cp.shard_positions(T, tokens.device)
    pos0 = cache.begin((B, T))          # (rows marked damaged until `end`: a failure midway leaves them unusable)
    hooks = [block.attn.register_forward_pre_hook(
        lambda attn, args, i=i: attn.fill_cache(_whole(cp, args[0], T), pos0, cache.layer(i)))
        for i, block in enumerate(model.layers)]
    try:
        h = model.hidden(tokens[:, at])
        held = at.tolist()
        last = model.logits(h[:, held.index(T - 1):held.index(T - 1) + 1]) if T - 1 in held else None
    finally:
        for hook in hooks:
            hook.remove()
        model.set_sequence_context(kept)
    cache.end(T)
    owner = cp.owner(cp.n_chunks - 1)[0]                      # the rank holding position T-1
    if last is None:
        last = torch.empty(B, 1, model.config.vocab_size, dtype=torch.float32, device=tokens.device)
    dist.broadcast(last, src=dist.get_global_rank(cp.group, owner), group=cp.group)
    return last


def _whole(cp: ContextParallel, x: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's rows x [B, n_r, C] of sequences of `total` positions -> [B, total, C] in position order."""
    widest = max(cp.local_len(total, r) for r in range(cp.world))
    mine = torch.cat((x, x.new_zeros(x.shape[0], widest - x.shape[1], *x.shape[2:])), 1).contiguous()
    every = x.new_empty(cp.world * x.shape[0], *mine.shape[1:])
    dist.all_gather_into_tensor(every, mine, group=cp.group)
    every = every.view(cp.world, *mine.shape)
    b = cp.bounds(total)
    parts = []
    for k in range(cp.n_chunks):                              # chunk k: slot `slot` of rank `rank`'s rows
        rank, slot = cp.owner(k)
        offset = sum(b[j + 1] - b[j] for j in cp.chunks_of(rank)[:slot])
        parts.append(every[rank][:, offset:offset + b[k + 1] - b[k]])
    return torch.cat(parts, 1)
