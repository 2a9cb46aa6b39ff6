"""KV-cache memory: what dsv4's cache allocates for a context, next to DeepSeek-V3.2 and a BF16 GQA model.

The dsv4 numbers come from the same record sizes and row counts `KVCache` allocates (a test checks the
equality), per sequence, main layers only (the MTP block decodes without a cache here).
  * per-token part: compressed entries (1 per `ratio` tokens) and, for CSA, indexer keys;
  * constant part: each layer's `window_size`-slot ring, the fp32 compressor state and one scratch record
    per compressed store (it absorbs masked writes).
Baselines, per token: DeepSeek-V3.2 keeps 61 MLA layers of a 576-dim latent (FP8 serving record 656 B:
512 e4m3 + 4 fp32 scales + 64 bf16 rope; BF16 1152 B) plus 128-dim indexer keys (FP8 132 B, BF16 256 B);
the GQA baseline keeps K and V of 8 heads x 128 dims in BF16 in as many layers as the model has.
"""
from __future__ import annotations

from collections import OrderedDict

from ..config import V32, ModelConfig
from .layout import record_bytes

V32_LAYERS = V32.n_layers
_V32_ROW = V32.kv_lora_rank + V32.qk_rope_head_dim
# FP8 serving record: e4m3 latent, one fp32 scale per 128 of it, bf16 rope dims; BF16: the whole row
V32_RECORD = {"fp8": V32.kv_lora_rank + 4 * (V32.kv_lora_rank // 128) + 2 * V32.qk_rope_head_dim, "bf16": 2 * _V32_ROW}
V32_INDEX = {"fp8": V32.index_head_dim + 4, "bf16": 2 * V32.index_head_dim}  # e4m3 key + one fp32 scale; bf16 key
GQA_HEADS, GQA_DIM = 8, 128


def layer_bytes(cfg: ModelConfig, layer_id: int, context: int, kv_dtype: str, index_dtype: str) -> dict:
    """Bytes one sequence's cache of one layer takes at `context` positions, split into parts."""
    D, rd, W, m = cfg.head_dim, cfg.rope_head_dim, cfg.window_size, cfg.compress_ratios[layer_id]
    kv_rec = record_bytes(kv_dtype, D, rd, "kv")
    out = {"window": W * kv_rec, "entries": 0, "index_keys": 0, "state": 0}
    if m:
        coff = 2 if cfg.layer_kind(layer_id) == "csa" else 1
        out["entries"] = (context // m) * kv_rec
        out["state"] = 2 * (coff * m) * (coff * D) * 4 + kv_rec      # kv + score, fp32; + a scratch record
    if cfg.layer_kind(layer_id) == "csa":
        Di = cfg.index_head_dim
        out["index_keys"] = (context // m) * record_bytes(index_dtype, Di, rd, "index")
        out["state"] += 2 * (2 * m) * (2 * Di) * 4 + record_bytes(index_dtype, Di, rd, "index")
    return out


def kv_report(cfg: ModelConfig, context: int, kv_dtype: str = "fp8", index_dtype: str = "fp4") -> dict:
    """Per-layer-type and total bytes for one sequence of `context` tokens, with the V3.2 and GQA baselines."""
    kinds: "OrderedDict[str, dict]" = OrderedDict()
    for i in range(cfg.n_layers):
        b = layer_bytes(cfg, i, context, kv_dtype, index_dtype)
        m = cfg.compress_ratios[i]
        per_token = 0.0
        if m:
            per_token = record_bytes(kv_dtype, cfg.head_dim, cfg.rope_head_dim, "kv") / m
            if cfg.layer_kind(i) == "csa":
                per_token += record_bytes(index_dtype, cfg.index_head_dim, cfg.rope_head_dim, "index") / m
        row = kinds.setdefault(cfg.layer_kind(i), {"layers": 0, "bytes_per_token": 0.0, "constant_bytes": 0,
                                                    "bytes_total": 0})
        row["layers"] += 1
        row["bytes_per_token"] += per_token
        row["constant_bytes"] += b["window"] + b["state"]
        row["bytes_total"] += sum(b.values())
    total = sum(r["bytes_total"] for r in kinds.values())
    per_token = sum(r["bytes_per_token"] for r in kinds.values())
    base = "fp8" if kv_dtype == "fp8" else "bf16"
    v32_per_token = V32_LAYERS * (V32_RECORD[base] + V32_INDEX[base])
    gqa_per_token = cfg.n_layers * 2 * GQA_HEADS * GQA_DIM * 2
    return {
        "context": context, "kv_dtype": kv_dtype, "index_dtype": index_dtype,
        "bytes_total": total, "bytes_per_token": per_token,
        "constant_bytes": sum(r["constant_bytes"] for r in kinds.values()),
        "layer_types": kinds,
        "v32_bytes_total": v32_per_token * context, "v32_bytes_per_token": v32_per_token,
        "gqa_bf16_bytes_total": gqa_per_token * context, "gqa_bf16_bytes_per_token": gqa_per_token,
        "ratio_vs_v32": total / (v32_per_token * context), "ratio_vs_gqa_bf16": total / (gqa_per_token * context),
    }


def format_kv_report(name: str, rep: dict) -> str:
    gib = 2 ** 30
    lines = [f"{name}: KV cache for one sequence of {rep['context']:,} tokens "
             f"(kv {rep['kv_dtype']}, indexer keys {rep['index_dtype']}; main layers, MTP excluded)",
             f"{'layer type':<10}{'layers':>7}{'bytes/token':>14}{'constant':>14}{'total':>14}"]
    for kind, r in rep["layer_types"].items():
        lines.append(f"{kind:<10}{r['layers']:>7}{r['bytes_per_token']:>14.1f}"
                     f"{r['constant_bytes'] / 2**20:>11.2f} MiB{r['bytes_total'] / gib:>10.3f} GiB")
    lines += [f"{'dsv4':<17}{rep['bytes_per_token']:>14.1f}{rep['constant_bytes'] / 2**20:>11.2f} MiB"
              f"{rep['bytes_total'] / gib:>10.3f} GiB",
              f"{'DeepSeek-V3.2':<17}{rep['v32_bytes_per_token']:>14.1f}{'':>14}{rep['v32_bytes_total'] / gib:>10.3f} GiB"
              f"   dsv4 = {100 * rep['ratio_vs_v32']:.1f}%",
              f"{'GQA 8x128 BF16':<17}{rep['gqa_bf16_bytes_per_token']:>14.1f}{'':>14}"
              f"{rep['gqa_bf16_bytes_total'] / gib:>10.3f} GiB   dsv4 = {100 * rep['ratio_vs_gqa_bf16']:.2f}%"]
    return "\n".join(lines)


def plot_kv(cfg_by_name: dict[str, ModelConfig], path: str, kv_dtype: str = "fp8", index_dtype: str = "fp4",
            max_context: int = 1 << 20) -> None:
    """KV GiB vs context (log-log): each model, DeepSeek-V3.2 and the GQA baseline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    contexts = [1 << k for k in range(10, max_context.bit_length())]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, cfg in cfg_by_name.items():
        reps = [kv_report(cfg, c, kv_dtype, index_dtype) for c in contexts]
        ax.plot(contexts, [r["bytes_total"] / 2**30 for r in reps], marker="o", label=f"dsv4 {name}")
    first = next(iter(cfg_by_name.values()))
    reps = [kv_report(first, c, kv_dtype, index_dtype) for c in contexts]
    ax.plot(contexts, [r["v32_bytes_total"] / 2**30 for r in reps], "k--", label="DeepSeek-V3.2 (61 MLA layers)")
    ax.plot(contexts, [r["gqa_bf16_bytes_total"] / 2**30 for r in reps], ":", color="gray",
            label=f"GQA 8x128 BF16, {first.n_layers} layers")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("KV cache per sequence (GiB)")
    ax.set_title(f"KV cache: kv {kv_dtype}, indexer keys {index_dtype}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
