"""The greedy speculative step's device part as one function, so a GPU replays it as one CUDA graph.

Unfused, a speculative step's verify runs as a graph replay (checkpoint + forward), then eager acceptance and kept
counts, then a second replay (rollback), each eager op a kernel launch. With every row greedy, the acceptance
needs no random numbers: compare the drafts with the verify's argmax, count the kept tokens and roll the cache
back, all on device data. `greedy_verify` does checkpoint + verify forward + acceptance + rollback + the step's
host results packed in one tensor, so the step waits for the device once (one transfer of that tensor).

The packed result [B, 5 + k] (long): accepted count a, next token y, draft count, finite flag of the emitted
target rows, kept count keep, then the k drafts. The cache's device positions end at starts + keep; the host
mirror is the caller's (KVCache.end_rollback with `host_checkpoint`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import CacheCheckpoint, KVCache

PACKED = 5   # leading columns of the packed result before the drafts


def greedy_accept(target: torch.Tensor, drafts: torch.Tensor, n_drafts: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted counts [B], next tokens [B]) for the target logits [B, k+1, V]: the longest prefix of the first
    n_drafts[b] drafts [B, k] equal to the target's argmax, then the argmax after it. Device ops only."""
    k = drafts.shape[1]
    best = target.argmax(-1)                                          # [B, k + 1]
    matched = (drafts == best[:, :k]) & (torch.arange(k, device=target.device) < n_drafts[:, None])
    a = matched.long().cumprod(-1).sum(-1)
    return a, best.gather(1, a[:, None])[:, 0]


def kept_counts(a: torch.Tensor, drafts: torch.Tensor, stop_t: torch.Tensor, budget_live: torch.Tensor
                ) -> torch.Tensor:
    """The tokens each row's caches keep [B] (device): x and its a accepted drafts, less the last when the row
    finished with it (a drafted stop token accepted, or its budget reached; it is never fed), 0 for a row that
    does not go on after x (budget_live: [2, B] budgets and the host's live flags)."""
    budget, live = budget_live[0], budget_live[1].bool()
    if drafts.shape[1]:
        last = drafts.gather(1, (a - 1).clamp(min=0)[:, None])             # the last accepted draft
        stopped = (a > 0) & (last == stop_t).any(-1)
    else:
        stopped = torch.zeros_like(live)
    finished = stopped | (a + 1 >= budget)
    return torch.where(live, torch.where(finished, a, a + 1), 0)


@dataclass
class FusedOut:
    h: torch.Tensor          # [B, k + 1, R, C] the verify's main lanes
    target: torch.Tensor     # [B, k + 1, V] fp32 target logits
    y: torch.Tensor          # [B] next tokens
    packed: torch.Tensor     # [B, PACKED + k] the host results (module doc)
    a: torch.Tensor          # [B] accepted counts
    keep: torch.Tensor       # [B] kept counts
    row_finite: torch.Tensor  # [B, k + 1] whether each target row is finite


def greedy_verify(model, cache: KVCache, x_ids: torch.Tensor, drafts: torch.Tensor, n_drafts: torch.Tensor,
                  stop_t: torch.Tensor, budget_live: torch.Tensor, x_finite: torch.Tensor | None = None) -> FusedOut:
    """Verify [x, drafts] on `cache` (rows at their positions), accept greedily and keep only the kept tokens:
    the same tokens and cache as the unfused verify + `accept_batch` (greedy) + rollback. No host value is read,
    so a CUDA graph can capture it (the cache's host bookkeeping of the forward is the caller's, as for any
    captured step). `x_finite` [B], when given, is and-ed into the packed finite flag (x's own logits)."""
    n_tokens = drafts.shape[1] + 1
    ckpt = cache.checkpoint(n_tokens)
    h = model.hidden(torch.cat((x_ids[:, None], drafts), 1), cache=cache)
    target = model.logits(h)
    a, y = greedy_accept(target, drafts, n_drafts)
    keep = kept_counts(a, drafts, stop_t, budget_live)
    cache.rollback_on_device(ckpt, keep)
    emitted = torch.arange(n_tokens, device=target.device) < a[:, None]
    row_finite = torch.isfinite(target).all(-1)
    finite = (row_finite | ~emitted).all(-1)
    if x_finite is not None:
        finite = finite & x_finite
    packed = torch.cat((torch.stack((a, y, n_drafts, finite.long(), keep), 1), drafts), 1)
    return FusedOut(h, target, y, packed, a, keep, row_finite)


def host_checkpoint(starts: list[int], n_tokens: int) -> CacheCheckpoint:
    """The host side of a fused step's checkpoint (the rows' positions before it), for KVCache.end_rollback."""
    return CacheCheckpoint(list(starts), n_tokens, None, None)
