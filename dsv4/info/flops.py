"""Inference FLOPs of one decode token at a context length, split by component, next to DeepSeek-V3.2.

What is counted: the matrix products of one forward step of one token at position N - 1 (it attends to N
positions, itself included), at 2 FLOPs per multiply-add, exactly the products dsv4's model runs on its cached
decode path (`Transformer(tokens, cache=..., last_only=True)`), which `tests/test_flops.py` checks against
`torch.utils.flop_counter.FlopCounterMode` module by module. Not counted (element-wise or O(d) per token, below
1% of the total at any context): norms, RoPE, SwiGLU and clamps, softmax and the sinks, the ReLU of the indexer,
top-k selection, the compressor's gated pooling (a per-channel softmax over 2m or m rows, once per m tokens), the
mHC Sinkhorn iterations and the lane collapse (R multiply-adds per channel), and the embedding lookup. The MTP
block is left out (plain decoding does not run it), as is the FP4/FP8 quantisation simulation (the Hadamard of
the indexer's queries and keys is a fast transform, not a matmul, in a real kernel).

Components (V4):
  * projections: attention wq_a, wq_b, wkv, the grouped low-rank output (wo_a per group, then wo_b);
  * experts: router, routed (top-k) and shared SwiGLU experts;
  * indexer: its query projection, head weights and the scores against every visible compressed key (CSA);
  * attention: q.k and p.v over the window (min(W, N) rows) and the attended compressed entries (all N//m in
    HCA, the indexer's top-k of them in CSA); the sink adds no product;
  * compressor: the wkv/wgate projections of the main and (CSA) indexer compressors, every token;
  * mhc: the mixing logits (fn . lanes) and the lane mix comb^T . lanes around both sublayers of each block;
  * head: the final lane collapse's logits and the LM head.
DeepSeek-V3.2 (`dsv4.config.V32`), decoding as its reference does (MLA absorbed into the 576-dim latent, the mode
DSA's kernels run): projections (q low-rank, kv latent, the absorbed q_nope -> latent and latent -> v products, wo),
experts (3 dense layers, then router + 8 routed + 1 shared), indexer (q, its one key head, weights, and scores
over all N earlier tokens), attention over min(2048, N) selected tokens (576-dim scores, 512-dim values), head.
Without context, the products are one multiply-add per active weight: V4 matches `dsv4 info`'s active
parameters (13.27B Flash, 48.86B Pro; tested), V3.2 gives 37.5B (published: 37B activated).

At 1M tokens V3.2's cost is dominated by its indexer scoring every token of the context in each of its 61 layers;
V4 scores one compressed key per 4 tokens in its CSA layers only, and HCA attends to 1 entry per 128 tokens.
At 1,048,576 tokens: V4-Pro 304 GFLOP = 26.1% of V3.2's 1166 (published: 27%), V4-Flash 141 GFLOP = 12.1%
(published: 10%). Flash's total is 65% indexer, so conventions that weigh the indexer's FP4 products differently
move it most; BENCHMARKS.md#efficiency-claims-flops has the table and the discussion.
"""
from __future__ import annotations

from ..config import V32, ModelConfig, V32Config

COMPONENTS = ("projections", "experts", "indexer", "attention", "compressor", "mhc", "head")


def _zero() -> dict[str, float]:
    return {c: 0.0 for c in COMPONENTS}


def layer_flops(cfg: ModelConfig, layer_id: int, context: int) -> dict[str, float]:
    """Matmul FLOPs of main layer `layer_id` for the decode token that attends to `context` positions."""
    C, H, D, qL = cfg.dim, cfg.n_heads, cfg.head_dim, cfg.q_lora_rank
    G, oL, m, kind = cfg.o_groups, cfg.o_lora_rank, cfg.compress_ratios[layer_id], cfg.layer_kind(layer_id)
    out = _zero()
    # wq_a, wq_b, wkv, wo_a (G groups of [o_lora, H*D/G]: H*D*o_lora in all), wo_b
    out["projections"] = 2 * (C * qL + qL * H * D + C * D + H * D * oL + G * oL * C)
    attended = min(cfg.window_size, context)
    if m:
        n_entries = context // m
        coff = 2 if kind == "csa" else 1
        out["compressor"] = 2 * 2 * C * coff * D                      # wkv + wgate
        if kind == "csa":
            Hi, Di = cfg.index_n_heads, cfg.index_head_dim
            out["compressor"] += 2 * 2 * C * 2 * Di                   # the indexer's own (overlapping) compressor
            out["indexer"] = 2 * (qL * Hi * Di + C * Hi + Hi * Di * n_entries + Hi * n_entries)
            attended += min(cfg.index_topk, n_entries)
        else:
            attended += n_entries
    out["attention"] = 2 * 2 * H * D * attended                      # q.k and p.v over one shared K=V head
    if cfg.hc_mode != "none":
        R = cfg.hc_mult
        out["mhc"] = 2 * (2 * (2 + R) * R * R * C + 2 * R * R * C)    # attn and ffn sites: mixes + comb^T lanes
    E, k, F = cfg.n_routed_experts, cfg.n_activated_experts, cfg.moe_inter_dim
    out["experts"] = 2 * C * E + (k + cfg.n_shared_experts) * 3 * 2 * C * F
    return out


def v4_flops(cfg: ModelConfig, context: int) -> dict[str, float]:
    """Per-component matmul FLOPs of one decode token of `cfg` at `context` (main layers + head, no MTP)."""
    total = _zero()
    for i in range(cfg.n_layers):
        for c, v in layer_flops(cfg, i, context).items():
            total[c] += v
    R = cfg.hc_mult
    total["head"] = 2 * cfg.dim * cfg.vocab_size + (2 * R * R * cfg.dim if cfg.hc_mode != "none" else 0)
    return total


def v32_flops(context: int, v32: V32Config = V32) -> dict[str, float]:
    """Per-component matmul FLOPs of one DeepSeek-V3.2 decode token at `context` (main layers + head)."""
    C, H, qL, kvL = v32.dim, v32.n_heads, v32.q_lora_rank, v32.kv_lora_rank
    nope, rope, vd = v32.qk_nope_head_dim, v32.qk_rope_head_dim, v32.v_head_dim
    Hi, Di = v32.index_n_heads, v32.index_head_dim
    per_layer = _zero()
    # wq_a, wq_b, wkv_a (latent + rope key), q_nope -> latent (absorbed wkv_b), latent -> v (absorbed), wo
    per_layer["projections"] = 2 * (C * qL + qL * H * (nope + rope) + C * (kvL + rope) + H * nope * kvL
                                    + H * kvL * vd + H * vd * C)
    # wq_b, wk (one key head), weights_proj; then q.k over every one of the N tokens and the head-weighted sum
    per_layer["indexer"] = 2 * (qL * Hi * Di + C * Di + C * Hi + Hi * Di * context + Hi * context)
    per_layer["attention"] = 2 * H * min(v32.index_topk, context) * ((kvL + rope) + kvL)
    total = {c: v * v32.n_layers for c, v in per_layer.items()}
    moe = 2 * C * v32.n_routed_experts + (v32.n_activated_experts + v32.n_shared_experts) * 3 * 2 * C * v32.moe_inter_dim
    dense = 3 * 2 * C * v32.dense_inter_dim
    total["experts"] = v32.n_dense_layers * dense + (v32.n_layers - v32.n_dense_layers) * moe
    total["head"] = 2 * C * v32.vocab_size
    return total


def flops_report(cfg: ModelConfig, context: int) -> dict:
    """FLOPs per decode token at `context`: totals, per component, per layer type, and the V3.2 baseline."""
    if context <= 0:
        raise ValueError(f"context must be positive, got {context}")
    comps = v4_flops(cfg, context)
    base = v32_flops(context)
    kinds: dict[str, dict] = {}
    for i in range(cfg.n_layers):
        row = kinds.setdefault(cfg.layer_kind(i), {"layers": 0, "flops": 0.0})
        row["layers"] += 1
        row["flops"] += sum(layer_flops(cfg, i, context).values())
    total, v32_total = sum(comps.values()), sum(base.values())
    return {"context": context, "flops_per_token": total, "components": comps, "layer_types": kinds,
            "v32_flops_per_token": v32_total, "v32_components": base, "ratio_vs_v32": total / v32_total}


def format_flops_report(name: str, rep: dict) -> str:
    g = 1e9
    lines = [f"{name}: matmul FLOPs of one decode token at context {rep['context']:,} (forward, main layers + head)",
             f"{'component':<13}{'dsv4 GFLOP':>12}{'V3.2 GFLOP':>12}"]
    for c in COMPONENTS:
        lines.append(f"{c:<13}{rep['components'][c] / g:>12.2f}{rep['v32_components'][c] / g:>12.2f}")
    lines.append(f"{'total':<13}{rep['flops_per_token'] / g:>12.2f}{rep['v32_flops_per_token'] / g:>12.2f}"
                 f"   dsv4 = {100 * rep['ratio_vs_v32']:.1f}% of DeepSeek-V3.2")
    return "\n".join(lines)


def plot_flops(cfg_by_name: dict[str, ModelConfig], path: str, max_context: int = 1 << 20) -> None:
    """GFLOPs per decode token vs context (log-x), each model and DeepSeek-V3.2, as the V4 report plots it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    contexts = [1 << k for k in range(10, max_context.bit_length())]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, cfg in cfg_by_name.items():
        ax.plot(contexts, [sum(v4_flops(cfg, c).values()) / 1e9 for c in contexts], marker="o", label=f"dsv4 {name}")
    ax.plot(contexts, [sum(v32_flops(c).values()) / 1e9 for c in contexts], "k--", label="DeepSeek-V3.2")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("GFLOPs per decode token")
    ax.set_title("Single-token inference FLOPs (matmuls, forward)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
