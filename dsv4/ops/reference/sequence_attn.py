"""Whole-sequence form of V4 attention (training and plain forwards): no index lists, no gathers.

Each query sees the raw KV of its last `window` positions and the compressed entries `entry_mask` allows,
in one softmax with a per-head sink. The window part is computed block-locally (query block b against key
blocks b-1 and b), the compressed part densely against all entries with a mask, so memory is
O(S * (2W + n_entries)) scores per head and nothing is gathered. Same math as `sparse_attn`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_attn(q: torch.Tensor, kv: torch.Tensor, entries: torch.Tensor | None, entry_mask: torch.Tensor | None,
                  sink: torch.Tensor, scale: float, window: int, return_entry_probs: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q: [B, S, H, D] at positions 0..S-1; kv: [B, S, D]; entries: [B, N, D]; entry_mask: [B, S, N] bool.

    Returns o [B, S, H, D] (q.dtype) and, if asked, the softmax probabilities of the entries [B, S, H, N]
    (fp32, within the joint window + entries + sink softmax).
    """
    B, S, H, D = q.shape
    W = min(window, S)
    nb = -(-S // W)
    pad = nb * W - S
    qf = F.pad(q.float(), (0, 0, 0, 0, 0, pad)).view(B, nb, W, H, D)
    kf = F.pad(kv.float(), (0, 0, W, pad))                               # a zero block in front
    keys = torch.stack((kf[:, :-W].view(B, nb, W, D), kf[:, W:].view(B, nb, W, D)), 2).flatten(2, 3)  # [B,nb,2W,D]
    s_win = torch.einsum("bnqhd,bnkd->bnhqk", qf, keys) * scale           # [B, nb, H, W, 2W]
    qi = torch.arange(W, device=q.device).view(W, 1)
    kj = torch.arange(2 * W, device=q.device).view(1, 2 * W) - W          # key offset relative to block start
    blk = torch.arange(nb, device=q.device).view(nb, 1, 1)
    ok = (kj <= qi) & (kj > qi - W) & (blk * W + kj >= 0)                  # [nb, W, 2W]
    s_win = s_win.masked_fill(~ok.unsqueeze(1), float("-inf"))
    s_win = s_win.permute(0, 1, 3, 2, 4).reshape(B, nb * W, H, 2 * W)[:, :S]   # [B, S, H, 2W]
    parts = [s_win]
    if entries is not None and entries.shape[1] > 0:
        s_ent = torch.einsum("bshd,bnd->bshn", q.float(), entries.float()) * scale
        parts.append(s_ent.masked_fill(~entry_mask.unsqueeze(2), float("-inf")))
    parts.append(sink.float().view(1, 1, H, 1).expand(B, S, H, 1))
    probs = torch.softmax(torch.cat(parts, -1), dim=-1)
    p_win = probs[..., :2 * W]
    p_win = F.pad(p_win, (0, 0, 0, 0, 0, pad)).view(B, nb, W, H, 2 * W)
    o = torch.einsum("bnqhk,bnkd->bnqhd", p_win, keys).reshape(B, nb * W, H, D)[:, :S]
    p_ent = None
    if len(parts) == 3:
        p_ent = probs[..., 2 * W:-1]
        o = o + torch.einsum("bshn,bnd->bshd", p_ent, entries.float())
    return o.to(q.dtype), (p_ent if return_entry_probs else None)
