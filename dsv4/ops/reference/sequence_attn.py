"""Whole-sequence form of V4 attention (training and plain forwards): no index lists, no gathers.

Each query sees the raw KV of its last `window` positions and the compressed entries `entry_mask` allows,
in one softmax with a per-head sink. The window part is computed block-locally (query block b against key
blocks b-1 and b), the compressed part densely against all entries with a mask. Queries run in chunks of
whole window blocks; under autograd each chunk is checkpointed, so training memory holds one chunk's fp32
scores [chunk, H, window + entries] at a time instead of the whole sequence's (what lets a 64K-token step
fit). Same math as `sparse_attn`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# fp32 score elements (queries x heads x keys) per chunk: ~1 GiB of scores
CHUNK_ELEMENTS = 1 << 28


def sequence_attn(q: torch.Tensor, kv: torch.Tensor, entries: torch.Tensor | None, entry_mask: torch.Tensor | None,
                  sink: torch.Tensor, scale: float, window: int, return_entry_probs: bool = False,
                  *, chunk_fn=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q: [B, S, H, D] at positions 0..S-1; kv: [B, S, D]; entries: [B, N, D]; entry_mask: [B, S, N] bool.

    Returns o [B, S, H, D] (q.dtype) and, if asked, each entry's softmax probability within the joint window +
    entries + sink softmax, summed over heads: [B, S, N] fp32, detached (the indexer's KL target).
    chunk_fn: what computes one chunk (default `chunk_attn`; ops.compiled passes its compiled form).
    """
    chunk_fn = chunk_fn or chunk_attn
    B, S, H, D = q.shape
    W = min(window, S)
    N = 0 if entries is None else entries.shape[1]
    per_block = W * H * (2 * W + N + 1)
    blocks = max(1, CHUNK_ELEMENTS // per_block)
    chunk = blocks * W
    outs, masses = [], []
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        prev = kv[:, s0 - W:s0] if s0 else None
        args = (q[:, s0:s1], kv[:, s0:s1], prev, entries, None if entry_mask is None else entry_mask[:, s0:s1],
                sink, scale, W, return_entry_probs)
        if torch.is_grad_enabled() and chunk < S:
            o, mass = checkpoint(chunk_fn, *args, use_reentrant=False)
        else:
            o, mass = chunk_fn(*args)
        outs.append(o)
        masses.append(mass)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    mass = None
    if return_entry_probs and N:
        mass = masses[0] if len(masses) == 1 else torch.cat(masses, 1)
    return o, mass


def chunk_attn(q: torch.Tensor, kv: torch.Tensor, prev: torch.Tensor | None, entries: torch.Tensor | None,
                entry_mask: torch.Tensor | None, sink: torch.Tensor, scale: float, W: int, want_mass: bool):
    """Queries of one chunk (starting on a window-block boundary); `prev` holds the W rows before it (None at 0)."""
    B, S, H, D = q.shape
    nb = -(-S // W)
    pad = nb * W - S
    qf = F.pad(q.float(), (0, 0, 0, 0, 0, pad)).view(B, nb, W, H, D)
    front = kv.new_zeros(B, W, D) if prev is None else prev
    kf = F.pad(torch.cat((front, kv), 1).float(), (0, 0, 0, pad))
    keys = torch.stack((kf[:, :-W].view(B, nb, W, D), kf[:, W:].view(B, nb, W, D)), 2).flatten(2, 3)  # [B,nb,2W,D]
    s_win = torch.einsum("bnqhd,bnkd->bnhqk", qf, keys) * scale           # [B, nb, H, W, 2W]
    qi = torch.arange(W, device=q.device).view(W, 1)
    kj = torch.arange(2 * W, device=q.device).view(1, 2 * W) - W          # key offset relative to block start
    blk = torch.arange(nb, device=q.device).view(nb, 1, 1)
    ok = (kj <= qi) & (kj > qi - W) & ((blk * W + kj >= 0) | (prev is not None))   # [nb, W, 2W]
    s_win = s_win.masked_fill(~ok.unsqueeze(1), float("-inf"))
    s_win = s_win.permute(0, 1, 3, 2, 4).reshape(B, nb * W, H, 2 * W)[:, :S]   # [B, S, H, 2W]
    parts = [s_win]
    has_entries = entries is not None and entries.shape[1] > 0
    if has_entries:
        s_ent = torch.einsum("bshd,bnd->bshn", q.float(), entries.float()) * scale
        parts.append(s_ent.masked_fill(~entry_mask.unsqueeze(2), float("-inf")))
    parts.append(sink.float().view(1, 1, H, 1).expand(B, S, H, 1))
    probs = torch.softmax(torch.cat(parts, -1), dim=-1)
    p_win = probs[..., :2 * W]
    p_win = F.pad(p_win, (0, 0, 0, 0, 0, pad)).view(B, nb, W, H, 2 * W)
    o = torch.einsum("bnqhk,bnkd->bnqhd", p_win, keys).reshape(B, nb * W, H, D)[:, :S]
    mass = None
    if has_entries:
        p_ent = probs[..., 2 * W:-1]
        o = o + torch.einsum("bshn,bnd->bshd", p_ent, entries.float())
        mass = p_ent.detach().sum(2) if want_mass else None
    return o.to(q.dtype), mass
