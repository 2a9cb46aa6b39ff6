"""Parameter accounting: total and activated parameters, per layer type.

Conventions (they reproduce the published 284B/13B for V4-Flash and 1.6T/49B for V4-Pro):
  * total  = every parameter of the main model (embedding and LM head included), MTP modules excluded;
  * active = parameters a token's forward pass multiplies with: everything except the embedding table
    (a lookup) and the routed experts not selected (n_activated of n_routed per MoE layer); MTP excluded.
MTP parameters are reported separately.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ..config import ModelConfig
from ..model import Transformer


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_report(cfg: ModelConfig) -> dict:
    with torch.device("meta"):
        model = Transformer(cfg)
    frac = cfg.n_activated_experts / cfg.n_routed_experts
    kinds: "OrderedDict[str, dict]" = OrderedDict()
    for i, block in enumerate(model.layers):
        kind = cfg.layer_kind(i) + ("+hash" if cfg.is_hash_layer(i) else "")
        routed = _count(block.ffn.experts)
        attn = _count(block.attn)
        row = kinds.setdefault(kind, {"layers": 0, "attention": 0, "compressor_indexer": 0, "routed_experts": 0,
                                      "shared_expert_gate": 0, "mhc_norms": 0, "total": 0, "active": 0})
        comp = sum(_count(getattr(block.attn, n)) for n in ("compressor", "indexer") if hasattr(block.attn, n))
        row["layers"] += 1
        row["attention"] += attn - comp
        row["compressor_indexer"] += comp
        row["routed_experts"] += routed
        row["shared_expert_gate"] += _count(block.ffn) - routed
        row["mhc_norms"] += _count(block) - attn - _count(block.ffn)
        row["total"] += _count(block)
        row["active"] += _count(block) - routed + round(routed * frac)
    embed, head = model.embed.weight.numel(), model.head.weight.numel()
    top = _count(model) - _count(model.layers) - _count(model.mtp)  # embed, head, norm, hc_head
    total = top + sum(r["total"] for r in kinds.values())
    active = top - embed + sum(r["active"] for r in kinds.values())
    mtp_total = _count(model.mtp)
    mtp_active = sum(_count(b) - _count(b.ffn.experts) + round(_count(b.ffn.experts) * frac) for b in model.mtp)
    return {"total_params": total, "active_params": active, "embedding_params": embed, "head_params": head,
            "mtp_params": mtp_total, "mtp_active_params": mtp_active, "layer_types": kinds}


def format_report(name: str, rep: dict) -> str:
    def b(n: int) -> str:
        return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"
    cols = ["attention", "compressor_indexer", "routed_experts", "shared_expert_gate", "mhc_norms", "total",
            "active"]
    lines = [f"{name}: {b(rep['total_params'])} total, {b(rep['active_params'])} active "
             f"(MTP excluded: +{b(rep['mtp_params'])} total, +{b(rep['mtp_active_params'])} active)",
             f"{'layer type':<12}{'layers':>7}" + "".join(f"{c:>19}" for c in cols)]
    for kind, row in rep["layer_types"].items():
        lines.append(f"{kind:<12}{row['layers']:>7}" + "".join(f"{b(row[c]):>19}" for c in cols))
    lines.append(f"{'embedding':<19}{b(rep['embedding_params']):>19}   (not active: a table lookup)")
    lines.append(f"{'head':<19}{b(rep['head_params']):>19}")
    return "\n".join(lines)
