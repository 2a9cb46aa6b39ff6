"""DeepSeekMoE routing as V4 computes it (docs/architecture.md#moe), from the router logits on."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_route(logits: torch.Tensor, bias: torch.Tensor | None, fixed_idx: torch.Tensor | None, k: int,
              route_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, E] fp32 -> (routing weights [N, k] fp32, expert ids [N, k] int64, affinities [N, E]).

    Affinities s = sqrt(softplus(logits)); experts: top-k of s + bias (the bias steers selection only), or the
    given `fixed_idx` (hash-routed layers); weights: the selected s normalised to sum 1, times route_scale."""
    s = F.softplus(logits.float()).sqrt()
    idx = fixed_idx if fixed_idx is not None else (s + bias.float()).topk(k, dim=-1).indices
    w = s.gather(1, idx)
    return w / w.sum(-1, keepdim=True) * route_scale, idx, s
