"""ModelConfig: every DeepSeek-V4 architecture field, named as in the official `inference/config.json`.

Three JSON dialects are read (`ModelConfig.from_pretrained`):
  * the official hub `config.json` (`hidden_size`, `compress_ratios`, `rope_scaling`, ...),
  * the one `transformers` writes (`layer_types`, `compress_rates`, `rope_parameters`),
  * the official `inference/config.json` (`dim`, `n_layers`, `route_scale`, ...).
`to_hub_dict()` writes the official hub dialect plus the `transformers` keys, so both load it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelConfig", "ConfigError", "PRESETS"]


class ConfigError(ValueError):
    """A config value is missing, unknown or violates a constraint (the message names the field)."""


@dataclass(kw_only=True)
class ModelConfig:
    # embedding / trunk
    vocab_size: int
    dim: int
    n_layers: int
    norm_eps: float = 1e-6
    # attention (shared single K=V head, MQA)
    n_heads: int
    head_dim: int = 512
    rope_head_dim: int = 64           # trailing dims of each head that get (interleaved) RoPE
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window_size: int = 128
    # one entry per main layer, then one per MTP layer: 0 window-only, csa_ratio -> CSA, other -> HCA
    compress_ratios: tuple[int, ...]
    csa_ratio: int = 4                # the ratio that gets overlapping windows + the lightning indexer
    # lightning indexer (CSA layers)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # RoPE: window-only layers use rope_theta, compressed layers compress_rope_theta + YaRN
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536     # YaRN's original context; 0 disables YaRN
    beta_fast: int = 32
    beta_slow: int = 1
    max_seq_len: int = 1048576        # largest position the model is meant for (no buffers depend on it)
    # MoE
    n_routed_experts: int
    n_shared_experts: int = 1
    n_activated_experts: int
    moe_inter_dim: int
    n_hash_layers: int = 3
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.0
    swiglu_limit: float = 10.0
    # mHC
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    hc_mode: str = "mhc"              # "mhc" (V4); ablations: "hc" (unconstrained mixing), "none" (plain residual)
    # multi-token prediction
    n_mtp_layers: int = 1
    # storage format of the official checkpoint (informational; weights are dequantised on load)
    expert_dtype: str | None = None
    bos_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self) -> None:
        self.compress_ratios = tuple(int(r) for r in self.compress_ratios)
        n_ratio = len(self.compress_ratios)
        if n_ratio == self.n_layers:  # transformers drops the MTP entries: MTP blocks are window-only
            self.compress_ratios = self.compress_ratios + (0,) * self.n_mtp_layers
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {msg}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank", "o_groups",
                     "o_lora_rank", "window_size", "n_routed_experts", "n_activated_experts", "moe_inter_dim",
                     "hc_mult", "hc_sinkhorn_iters", "index_n_heads", "index_head_dim", "index_topk", "csa_ratio"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive int")
        for name in ("n_mtp_layers", "n_hash_layers", "n_shared_experts", "original_seq_len"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name,
                 "must be a non-negative int")
        need(self.n_shared_experts == 1, "n_shared_experts", "V4 has exactly one shared expert")
        need(self.rope_head_dim > 0 and self.rope_head_dim % 2 == 0, "rope_head_dim", "must be positive and even")
        need(self.rope_head_dim <= self.head_dim, "rope_head_dim", f"must be <= head_dim={self.head_dim}")
        need(self.rope_head_dim <= self.index_head_dim, "rope_head_dim",
             f"must be <= index_head_dim={self.index_head_dim} (the indexer ropes its trailing dims too)")
        need(self.n_heads % self.o_groups == 0, "o_groups", f"must divide n_heads={self.n_heads}")
        need(self.n_activated_experts <= self.n_routed_experts, "n_activated_experts",
             f"must be <= n_routed_experts={self.n_routed_experts}")
        need(self.n_hash_layers <= self.n_layers, "n_hash_layers", f"must be <= n_layers={self.n_layers}")
        need(self.score_func == "sqrtsoftplus", "score_func", "only 'sqrtsoftplus' (V4) is implemented")
        need(self.norm_eps > 0, "norm_eps", "must be > 0")
        need(self.hc_eps > 0, "hc_eps", "must be > 0")
        need(self.swiglu_limit >= 0, "swiglu_limit", "must be >= 0 (0 disables the clamp)")
        need(self.rope_theta > 0 and self.compress_rope_theta > 0, "rope_theta", "RoPE bases must be > 0")
        need(self.rope_factor >= 1, "rope_factor", "must be >= 1")
        need(self.expert_dtype in (None, "fp4", "fp8", "bf16"), "expert_dtype", "must be one of None/'fp4'/'fp8'/'bf16'")
        need(self.hc_mode in ("mhc", "hc", "none"), "hc_mode", "must be 'mhc', 'hc' or 'none'")
        need(self.hc_mode != "none" or self.hc_mult == 1, "hc_mult", "must be 1 with hc_mode='none' (one residual lane)")
        want = self.n_layers + self.n_mtp_layers
        need(len(self.compress_ratios) == want, "compress_ratios",
             f"needs n_layers + n_mtp_layers = {want} entries (or n_layers), got {len(self.compress_ratios)}")
        need(all(r >= 0 for r in self.compress_ratios), "compress_ratios", "entries must be >= 0")
        if self.index_head_dim & (self.index_head_dim - 1):
            raise ConfigError(f"index_head_dim={self.index_head_dim}: must be a power of two "
                              "(the indexer's Hadamard rotation needs it)")

    # ------------------------------------------------------------------ derived
    def layer_kind(self, layer_id: int) -> str:
        """'window', 'csa' or 'hca' for main layer `layer_id` (MTP blocks are n_layers, n_layers+1, ...)."""
        r = self.compress_ratios[layer_id]
        return "window" if r == 0 else ("csa" if r == self.csa_ratio else "hca")

    def is_hash_layer(self, layer_id: int) -> bool:
        return layer_id < self.n_hash_layers

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        return d

    # ------------------------------------------------------------------ JSON dialects
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from any of the three dialects (detected from the keys)."""
        if "dim" in d or "n_layers" in d:
            return cls._from_native(d)
        if "hidden_size" in d:
            return cls._from_hub(d)
        raise ConfigError("config has neither 'dim' (inference/config.json) nor 'hidden_size' (config.json)")

    @classmethod
    def _from_native(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        # keys of the official inference/config.json that describe storage/runtime, not architecture
        runtime = {"dtype", "scale_fmt", "scale_dtype", "max_batch_size"}
        unknown = sorted(k for k in d if k not in names and k not in runtime)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def _from_hub(cls, d: dict[str, Any]) -> "ModelConfig":
        def get(key: str, default: Any = _MISSING) -> Any:
            if key in d and d[key] is not None:
                return d[key]
            if default is _MISSING:
                raise ConfigError(f"config.json lacks required key '{key}'")
            return default

        n_layers = get("num_hidden_layers")
        n_mtp = get("num_nextn_predict_layers", 1)
        if get("num_key_value_heads", 1) != 1:
            raise ConfigError(f"num_key_value_heads={d['num_key_value_heads']}: V4 uses one shared K=V head")
        head_dim = get("head_dim", 512)
        rope_head_dim = d.get("qk_rope_head_dim")
        if rope_head_dim is None:
            rope_head_dim = int(round(head_dim * get("partial_rotary_factor", 64 / 512)))
        csa_ratio = 4
        if "layer_types" in d and d["layer_types"] is not None:
            rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
            rates.update(d.get("compress_rates") or {})
            csa_ratio = int(rates["compressed_sparse_attention"])
            type_to_ratio = {"sliding_attention": 0, "compressed_sparse_attention": csa_ratio,
                             "heavily_compressed_attention": int(rates["heavily_compressed_attention"])}
            bad = [t for t in d["layer_types"] if t not in type_to_ratio]
            if bad:
                raise ConfigError(f"layer_types: unknown entries {bad}; expected {sorted(type_to_ratio)}")
            if csa_ratio == type_to_ratio["heavily_compressed_attention"] and \
                    "heavily_compressed_attention" in d["layer_types"]:
                raise ConfigError(f"compress_rates: CSA and HCA share ratio {csa_ratio}; they must differ")
            ratios = [type_to_ratio[t] for t in d["layer_types"]]
        else:
            ratios = list(get("compress_ratios"))
        mlp_types = d.get("mlp_layer_types")
        n_hash = mlp_types.count("hash_moe") if mlp_types else get("num_hash_layers", 3)
        if mlp_types and mlp_types[:n_hash] != ["hash_moe"] * n_hash:
            raise ConfigError(f"mlp_layer_types={mlp_types}: hash_moe layers must come first")
        # RoPE / YaRN: official `rope_scaling`, or transformers' nested `rope_parameters`
        rope_theta = get("rope_theta", 10000.0)
        compress_theta = get("compress_rope_theta", 160000.0)
        yarn = d.get("rope_scaling") or {}
        rp = d.get("rope_parameters") or {}
        if isinstance(rp.get("compress"), dict):
            yarn = rp["compress"]
            compress_theta = yarn.get("rope_theta", compress_theta)
            rope_theta = rp.get("main", {}).get("rope_theta", rope_theta)
        elif rp and not yarn:
            yarn = rp
        yarn_type = yarn.get("rope_type", yarn.get("type", "default"))
        if yarn_type not in ("yarn", "default"):
            raise ConfigError(f"rope scaling type {yarn_type!r}: only 'yarn' (or none) is supported")
        if yarn_type == "yarn" and float(yarn.get("attention_factor", 1.0)) != 1.0:
            raise ConfigError(f"rope attention_factor={yarn['attention_factor']}: V4 applies no YaRN mscale")
        use_yarn = yarn_type == "yarn"
        return cls(
            vocab_size=get("vocab_size"), dim=get("hidden_size"), n_layers=n_layers, norm_eps=get("rms_norm_eps", 1e-6),
            n_heads=get("num_attention_heads"), head_dim=head_dim, rope_head_dim=rope_head_dim,
            q_lora_rank=get("q_lora_rank"), o_groups=get("o_groups"), o_lora_rank=get("o_lora_rank"),
            window_size=get("sliding_window", 128), compress_ratios=tuple(ratios), csa_ratio=csa_ratio,
            index_n_heads=get("index_n_heads", 64), index_head_dim=get("index_head_dim", 128),
            index_topk=get("index_topk", 512), rope_theta=float(rope_theta), compress_rope_theta=float(compress_theta),
            rope_factor=float(yarn.get("factor", 1.0)) if use_yarn else 1.0,
            original_seq_len=int(yarn.get("original_max_position_embeddings", 0)) if use_yarn else 0,
            beta_fast=int(yarn.get("beta_fast", 32)), beta_slow=int(yarn.get("beta_slow", 1)),
            max_seq_len=get("max_position_embeddings", 1048576),
            n_routed_experts=get("n_routed_experts"), n_shared_experts=get("n_shared_experts", 1),
            n_activated_experts=get("num_experts_per_tok"), moe_inter_dim=get("moe_intermediate_size"),
            n_hash_layers=n_hash, score_func=get("scoring_func", "sqrtsoftplus"),
            route_scale=float(get("routed_scaling_factor", 1.0)), swiglu_limit=float(get("swiglu_limit", 0.0)),
            hc_mult=get("hc_mult", 4), hc_sinkhorn_iters=get("hc_sinkhorn_iters", 20), hc_eps=get("hc_eps", 1e-6),
            hc_mode=d.get("hc_mode", "mhc"),
            n_mtp_layers=n_mtp, expert_dtype=d.get("expert_dtype"),
            bos_token_id=_first(get("bos_token_id", 0)), eos_token_id=_first(get("eos_token_id", 1)),
        )

    def to_hub_dict(self) -> dict[str, Any]:
        """The official hub `config.json`, plus `layer_types`/`compress_rates` so `transformers` reads any ratios."""
        main = self.compress_ratios[: self.n_layers]
        hca = sorted({r for r in main if r and r != self.csa_ratio})
        kinds = {"window": "sliding_attention", "csa": "compressed_sparse_attention",
                 "hca": "heavily_compressed_attention"}
        d: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "rms_norm_eps": self.norm_eps, "num_attention_heads": self.n_heads, "num_key_value_heads": 1,
            "head_dim": self.head_dim, "qk_rope_head_dim": self.rope_head_dim,
            "partial_rotary_factor": self.rope_head_dim / self.head_dim,
            "q_lora_rank": self.q_lora_rank, "o_groups": self.o_groups, "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.window_size, "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim, "index_topk": self.index_topk,
            "rope_theta": self.rope_theta, "compress_rope_theta": self.compress_rope_theta,
            "max_position_embeddings": self.max_seq_len, "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts, "num_experts_per_tok": self.n_activated_experts,
            "moe_intermediate_size": self.moe_inter_dim, "num_hash_layers": self.n_hash_layers,
            "scoring_func": self.score_func, "routed_scaling_factor": self.route_scale,
            "swiglu_limit": self.swiglu_limit, "topk_method": "noaux_tc", "norm_topk_prob": True,
            "hc_mult": self.hc_mult, "hc_sinkhorn_iters": self.hc_sinkhorn_iters, "hc_eps": self.hc_eps,
            "num_nextn_predict_layers": self.n_mtp_layers, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "tie_word_embeddings": False, "hidden_act": "silu",
            "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
            "compress_ratios": list(self.compress_ratios),
            "layer_types": [kinds[self.layer_kind(i)] for i in range(self.n_layers)],
            "compress_rates": {"compressed_sparse_attention": self.csa_ratio,
                               "heavily_compressed_attention": hca[0] if hca else 128},
            "mlp_layer_types": ["hash_moe" if self.is_hash_layer(i) else "moe" for i in range(self.n_layers)],
        }
        if self.original_seq_len > 0:
            d["rope_scaling"] = {"type": "yarn", "factor": self.rope_factor, "beta_fast": self.beta_fast,
                                 "beta_slow": self.beta_slow,
                                 "original_max_position_embeddings": self.original_seq_len}
        if self.expert_dtype:
            d["expert_dtype"] = self.expert_dtype
        if self.hc_mode != "mhc":
            d["hc_mode"] = self.hc_mode
        return d

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read `config.json` (or `inference/config.json`) from a checkpoint directory or a JSON file path."""
        path = os.fspath(path)
        candidates = [path] if path.endswith(".json") else [
            os.path.join(path, "config.json"), os.path.join(path, "inference", "config.json")]
        for p in candidates:
            if os.path.isfile(p):
                with open(p) as f:
                    try:
                        d = json.load(f)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{p}: not valid JSON ({e})") from None
                try:
                    return cls.from_dict(d)
                except ConfigError as e:
                    raise ConfigError(f"{p}: {e}") from None
                except TypeError as e:  # missing required field of the native dialect
                    raise ConfigError(f"{p}: {e}") from None
        raise ConfigError(f"no config.json found at {path}")

    def save(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_hub_dict(), f, indent=2)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        try:
            return PRESETS[name]()
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


_MISSING = object()


def _first(x: Any) -> int:
    return int(x[0] if isinstance(x, (list, tuple)) else x)


def flash() -> ModelConfig:
    """DeepSeek-V4-Flash (284B total / 13B active): 2 window-only layers, then CSA/HCA alternating."""
    return ModelConfig(
        vocab_size=129280, dim=4096, n_layers=43, n_heads=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024,
        compress_ratios=(0, 0) + (4, 128) * 20 + (4, 0), index_topk=512, n_routed_experts=256,
        n_activated_experts=6, moe_inter_dim=2048, route_scale=1.5, expert_dtype="fp4")


def pro() -> ModelConfig:
    """DeepSeek-V4-Pro (1.6T total / 49B active): 2 HCA layers, then CSA/HCA alternating."""
    return ModelConfig(
        vocab_size=129280, dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, o_groups=16, o_lora_rank=1024,
        compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0), index_topk=1024, n_routed_experts=384,
        n_activated_experts=6, moe_inter_dim=3072, route_scale=2.5, expert_dtype="fp4")


def tiny() -> ModelConfig:
    """A few-hundred-thousand-parameter V4 for CPU tests and the default training run: every layer type,
    hash routing, mHC and MTP, with short windows and ratios so that many groups complete in 100 tokens."""
    return ModelConfig(
        vocab_size=2048, dim=128, n_layers=4, n_heads=4, head_dim=64, rope_head_dim=16, q_lora_rank=64,
        o_groups=2, o_lora_rank=64, window_size=32, compress_ratios=(0, 4, 16, 4, 0),
        index_n_heads=16, index_head_dim=32, index_topk=8, original_seq_len=256, rope_factor=4.0,
        n_routed_experts=8, n_activated_experts=2, moe_inter_dim=128, n_hash_layers=1, route_scale=1.5,
        max_seq_len=4096)


def small() -> ModelConfig:
    """~230M total / ~90M active: a real trainable V4 on one GPU, Flash-like layer pattern and ratios."""
    return ModelConfig(
        vocab_size=32768, dim=768, n_layers=10, n_heads=12, head_dim=128, rope_head_dim=32, q_lora_rank=384,
        o_groups=4, o_lora_rank=384, window_size=128, compress_ratios=(0, 0) + (4, 128) * 4 + (0,),
        index_n_heads=16, index_head_dim=64, index_topk=256, original_seq_len=4096, rope_factor=16.0,
        n_routed_experts=16, n_activated_experts=4, moe_inter_dim=384, n_hash_layers=2, route_scale=1.5,
        max_seq_len=65536)


PRESETS = {"flash": flash, "pro": pro, "tiny": tiny, "small": small}
