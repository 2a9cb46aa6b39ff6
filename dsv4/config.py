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
import math
import os
from dataclasses import dataclass
from typing import Any

from .errors import DsV4Error

__all__ = ["ModelConfig", "ConfigError", "PRESETS", "V32Config", "V32"]


class ConfigError(DsV4Error, ValueError):
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
        self._check_types()
        n_ratio = len(self.compress_ratios)
        if n_ratio == self.n_layers:  # transformers drops the MTP entries: MTP blocks are window-only
            self.compress_ratios = self.compress_ratios + (0,) * self.n_mtp_layers
        self.validate()

    # ------------------------------------------------------------------ validation
    def _check_types(self) -> None:
        """Types are checked, not coerced: JSON `true` is no integer and 3.7 is no token id or compress ratio
        (int() would silently truncate them). An integral float (4.0) is taken as the integer it equals; an
        int is taken for a float field. Integers stay below 2**31 (every size and id indexes int32 tensors; a
        larger one would fail inside torch) and floats are finite."""
        def integer(name: str, v: Any) -> int:
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"{name}={v!r}: must be an integer, got {type(v).__name__}")
            if abs(v) >= _INT_LIMIT:
                raise ConfigError(f"{name}={v!r}: must be below 2**31")
            return v

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "int":
                setattr(self, f.name, integer(f.name, v))
            elif f.type == "float":
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ConfigError(f"{f.name}={v!r}: must be a number, got {type(v).__name__}")
                if not math.isfinite(v):
                    raise ConfigError(f"{f.name}={v!r}: must be a finite number")
                setattr(self, f.name, float(v))
            elif f.type == "str" and not isinstance(v, str):
                raise ConfigError(f"{f.name}={v!r}: must be a string, got {type(v).__name__}")
        if not isinstance(self.compress_ratios, (list, tuple)):
            raise ConfigError(f"compress_ratios={self.compress_ratios!r}: must be a list of integers")
        self.compress_ratios = tuple(integer(f"compress_ratios[{i}]", r) for i, r in enumerate(self.compress_ratios))

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
        need(self.rope_theta > 1, "rope_theta", "must be > 1 (a RoPE base)")
        need(self.compress_rope_theta > 1, "compress_rope_theta", "must be > 1 (a RoPE base)")
        need(self.beta_fast > 0, "beta_fast", "must be > 0 (YaRN's rotation count)")
        need(self.beta_slow > 0, "beta_slow", "must be > 0 (YaRN's rotation count)")
        for name in ("bos_token_id", "eos_token_id"):
            need(0 <= getattr(self, name) < self.vocab_size, name, f"must be a token id in [0, {self.vocab_size})")
        need(self.rope_factor >= 1, "rope_factor", "must be >= 1")
        need(self.route_scale > 0, "route_scale", "must be > 0 (it scales the routed experts' output)")
        need(self.max_seq_len > 0, "max_seq_len", "must be > 0")
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
        if not isinstance(d, dict):
            raise ConfigError(f"the config must be a JSON object, got {type(d).__name__}")
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
        ratios = d.get("compress_ratios")
        if not isinstance(ratios, (list, tuple)):
            raise ConfigError(f"compress_ratios={ratios!r}: inference/config.json needs a list, one entry per layer")
        compressed, csa = any(r != 0 for r in ratios), d.get("csa_ratio", 4) in ratios
        optional = _NATIVE_OPTIONAL | (set() if compressed else _COMPRESSED_ONLY) | (set() if csa else _CSA_ONLY)
        missing = sorted(names - optional - set(d))
        if missing:
            raise ConfigError(f"inference/config.json lacks required key(s) {missing} (no default: it changes the "
                              "model)")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def _from_hub(cls, d: dict[str, Any]) -> "ModelConfig":
        """The hub dialect. Which keys may be missing is decided as for `_NATIVE_OPTIONAL` (see there)."""
        def get(key: str, default: Any = _MISSING) -> Any:
            if key in d and d[key] is not None:
                return d[key]
            if default is _MISSING:
                raise ConfigError(f"config.json lacks required key '{key}' (no default: it changes the model)")
            return default

        def default(name: str) -> Any:
            return _FIELD_DEFAULTS[name]

        n_layers = get("num_hidden_layers")
        n_mtp = get("num_nextn_predict_layers", default("n_mtp_layers"))
        if get("num_key_value_heads", 1) != 1:
            raise ConfigError(f"num_key_value_heads={d['num_key_value_heads']}: V4 uses one shared K=V head")
        head_dim = get("head_dim")
        rope_head_dim = d.get("qk_rope_head_dim")
        if rope_head_dim is None:
            if d.get("partial_rotary_factor") is None:
                raise ConfigError("config.json lacks required key 'qk_rope_head_dim' (or 'partial_rotary_factor')")
            factor = d["partial_rotary_factor"]
            numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (head_dim, factor))
            rope_dims = head_dim * factor if numbers else math.nan
            if not math.isfinite(rope_dims) or rope_dims != round(rope_dims):
                raise ConfigError(f"partial_rotary_factor={d['partial_rotary_factor']!r} x head_dim={head_dim} is "
                                  "not a whole number of rotary dims")
            rope_head_dim = int(round(rope_dims))
        csa_ratio = 4
        if d.get("layer_types") is not None:
            if not isinstance(d["layer_types"], list):
                raise ConfigError(f"layer_types={d['layer_types']!r}: must be a list, one entry per layer")
            rates = get("compress_rates")
            if not isinstance(rates, dict):
                raise ConfigError(f"compress_rates={rates!r}: must map layer types to ratios")
            type_to_ratio = {"sliding_attention": 0}
            for kind in ("compressed_sparse_attention", "heavily_compressed_attention"):
                if kind in rates:
                    if isinstance(rates[kind], (int, float)) and not isinstance(rates[kind], bool) and \
                            not rates[kind] > 0:
                        raise ConfigError(f"compress_rates: {kind}={rates[kind]!r}: must be > 0")
                    type_to_ratio[kind] = rates[kind]
                elif kind in d["layer_types"]:
                    raise ConfigError(f"compress_rates={rates}: lacks the ratio of '{kind}' layers")
            csa_ratio = type_to_ratio.get("compressed_sparse_attention", csa_ratio)
            bad = [t for t in d["layer_types"] if t not in type_to_ratio]
            if bad:
                raise ConfigError(f"layer_types: unknown entries {bad}; expected {sorted(type_to_ratio)}")
            if csa_ratio == type_to_ratio.get("heavily_compressed_attention") and \
                    "heavily_compressed_attention" in d["layer_types"]:
                raise ConfigError(f"compress_rates: CSA and HCA share ratio {csa_ratio}; they must differ")
            ratios = [type_to_ratio[t] for t in d["layer_types"]]
            stated = d.get("compress_ratios")   # dsv4 writes both; its list also holds the MTP blocks' ratios
            if stated is not None and all(isinstance(r, int) and not isinstance(r, bool) for r in ratios):
                # (a mistyped rate is reported by the type check, naming it)
                if not isinstance(stated, list) or stated[:len(ratios)] != ratios:
                    raise ConfigError(f"compress_ratios={stated!r} disagrees with layer_types + compress_rates "
                                      f"({ratios}); give one or make them agree")
                ratios = stated
        else:
            ratios = get("compress_ratios")
            if not isinstance(ratios, (list, tuple)):
                raise ConfigError(f"compress_ratios={ratios!r}: must be a list, one entry per layer")
        compressed, csa = any(r != 0 for r in ratios), csa_ratio in ratios

        def needed_if(cond: bool, key: str, name: str) -> Any:
            return get(key) if cond else get(key, default(name))

        mlp_types = d.get("mlp_layer_types")
        if mlp_types is not None and (not isinstance(mlp_types, list) or
                                      any(t not in ("hash_moe", "moe") for t in mlp_types)):
            raise ConfigError(f"mlp_layer_types={mlp_types!r}: must be a list of 'hash_moe' / 'moe', one per layer")
        n_hash = mlp_types.count("hash_moe") if mlp_types else get("num_hash_layers")
        if mlp_types and mlp_types[:n_hash] != ["hash_moe"] * n_hash:
            raise ConfigError(f"mlp_layer_types={mlp_types}: hash_moe layers must come first")
        if mlp_types and len(mlp_types) != n_layers:
            raise ConfigError(f"mlp_layer_types has {len(mlp_types)} entries, num_hidden_layers={n_layers!r}")
        # RoPE / YaRN: official `rope_scaling`, or transformers' nested `rope_parameters`. V4 applies YaRN to the
        # compressed layers; the released hub configs state it in `rope_scaling` and transformers always writes
        # `rope_parameters`. A config with compressed layers and neither is refused rather than read as "no YaRN"
        # (which is what transformers would do, silently changing every compressed layer's rotary frequencies);
        # `"rope_scaling": null` states "no YaRN" explicitly, and `to_hub_dict` writes it for such models.
        rp = d["rope_parameters"] if d.get("rope_parameters") is not None else {}
        if not isinstance(rp, dict):
            raise ConfigError(f"rope_parameters={rp!r}: must be an object")
        if compressed and "rope_scaling" not in d and not rp:
            raise ConfigError("config.json lacks required key 'rope_scaling' (the compressed layers' YaRN; null "
                              "for none) or 'rope_parameters'")
        rope_theta = rp.get("main", {}).get("rope_theta") if isinstance(rp.get("main"), dict) else None
        rope_theta = rope_theta if rope_theta is not None else get("rope_theta")
        yarn = d["rope_scaling"] if d.get("rope_scaling") is not None else {}
        if not isinstance(yarn, dict):
            raise ConfigError(f"rope_scaling={yarn!r}: must be an object (or null)")
        if yarn and "type" not in yarn and "rope_type" not in yarn:  # not read as "no scaling" by default
            raise ConfigError(f"rope_scaling={yarn!r}: names no 'type' ('yarn'; null for no scaling)")
        compress_theta = None
        if isinstance(rp.get("compress"), dict):
            yarn = rp["compress"]
            compress_theta = yarn.get("rope_theta")
        elif rp and not yarn:
            yarn = rp
        if not isinstance(yarn, dict):
            raise ConfigError(f"rope_scaling={yarn!r}: must be an object (or null)")
        if compress_theta is None:
            compress_theta = needed_if(compressed, "compress_rope_theta", "compress_rope_theta")
        yarn_type = yarn.get("rope_type", yarn.get("type", "default"))
        if yarn_type not in ("yarn", "default"):
            raise ConfigError(f"rope scaling type {yarn_type!r}: only 'yarn' (or none) is supported")
        use_yarn = yarn_type == "yarn"
        if use_yarn:
            if yarn.get("attention_factor", 1.0) != 1.0:
                raise ConfigError(f"rope attention_factor={yarn['attention_factor']}: V4 applies no YaRN mscale")
            lacking = [k for k in ("factor", "original_max_position_embeddings") if yarn.get(k) is None]
            if lacking:
                raise ConfigError(f"rope scaling {yarn}: YaRN needs {lacking} (no default: it changes the model)")
            if yarn["original_max_position_embeddings"] == 0:  # 0 would mean "no YaRN" in ModelConfig
                raise ConfigError(f"rope scaling {yarn}: YaRN needs original_max_position_embeddings > 0")
        fields = dict(
            vocab_size=get("vocab_size"), dim=get("hidden_size"), n_layers=n_layers,
            norm_eps=get("rms_norm_eps", default("norm_eps")),
            n_heads=get("num_attention_heads"), head_dim=head_dim, rope_head_dim=rope_head_dim,
            q_lora_rank=get("q_lora_rank"), o_groups=get("o_groups"), o_lora_rank=get("o_lora_rank"),
            window_size=get("sliding_window"), compress_ratios=tuple(ratios), csa_ratio=csa_ratio,
            index_n_heads=needed_if(csa, "index_n_heads", "index_n_heads"),
            index_head_dim=needed_if(csa, "index_head_dim", "index_head_dim"),
            index_topk=needed_if(csa, "index_topk", "index_topk"),
            rope_theta=rope_theta, compress_rope_theta=compress_theta,
            rope_factor=yarn["factor"] if use_yarn else 1.0,
            original_seq_len=yarn["original_max_position_embeddings"] if use_yarn else 0,
            # YaRN's own defaults (transformers' and the reference's): not a guess about the model
            beta_fast=yarn.get("beta_fast", default("beta_fast")), beta_slow=yarn.get("beta_slow", default("beta_slow")),
            max_seq_len=get("max_position_embeddings", default("max_seq_len")),
            n_routed_experts=get("n_routed_experts"), n_shared_experts=get("n_shared_experts", 1),
            n_activated_experts=get("num_experts_per_tok"), moe_inter_dim=get("moe_intermediate_size"),
            n_hash_layers=n_hash, score_func=get("scoring_func", "sqrtsoftplus"),
            route_scale=get("routed_scaling_factor"), swiglu_limit=get("swiglu_limit"),
            hc_mult=get("hc_mult"), hc_sinkhorn_iters=get("hc_sinkhorn_iters"), hc_eps=get("hc_eps", default("hc_eps")),
            hc_mode=d.get("hc_mode", "mhc"), n_mtp_layers=n_mtp, expert_dtype=d.get("expert_dtype"),
            bos_token_id=_first("bos_token_id", get("bos_token_id", 0)),
            eos_token_id=_first("eos_token_id", get("eos_token_id", 1)),
        )
        try:
            return cls(**fields)
        except ConfigError as e:  # name this file's key too (the messages start with "<field>=")
            key = _HUB_KEYS.get(str(e).split("=", 1)[0].split("[", 1)[0])
            raise (ConfigError(f"{e} (config.json: '{key}')") if key else e) from None

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
        d["rope_scaling"] = None  # null: no YaRN (a config with compressed layers must say which)
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
        raise ConfigError(f"no config.json found at {path}" + _checkpoints_inside(path))

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


@dataclass(frozen=True)
class V32Config:
    """DeepSeek-V3.2 (the published DeepSeek-V3.2-Exp config.json), the baseline of V4's efficiency claims: MLA
    (a 512-dim latent + 64 rope dims per token, read by every head) with DeepSeek Sparse Attention (each query
    attends to the top-`index_topk` tokens its lightning indexer scores over the whole context), DeepSeekMoE
    with `n_dense_layers` dense FFN layers first. `dsv4 kv` and `dsv4 flops` compare against it."""
    n_layers: int = 61
    dim: int = 7168
    vocab_size: int = 129280
    n_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    n_dense_layers: int = 3           # first_k_dense_replace
    dense_inter_dim: int = 18432      # intermediate_size of those layers
    n_routed_experts: int = 256
    n_activated_experts: int = 8
    n_shared_experts: int = 1
    moe_inter_dim: int = 2048


V32 = V32Config()


def _checkpoints_inside(path: str) -> str:
    """A hint for a directory that holds checkpoints rather than being one, such as a training run
    (`run/final`, `run/checkpoints/step_*`): ' (did you mean run/final? ...)', or '' if it holds none."""
    if not os.path.isdir(path):
        return "" if os.path.exists(path) else " (no such directory)"

    def checkpoints(d: str) -> list[str]:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            return []
        return [os.path.join(d, n) for n in names if os.path.isfile(os.path.join(d, n, "config.json"))]

    found = checkpoints(path) + checkpoints(os.path.join(path, "checkpoints"))
    if not found:
        return ""
    final = os.path.join(path, "final")
    best = final if final in found else found[-1]   # a run's final export, else the newest step_* (sorted)
    others = [f for f in found if f != best]
    more = f" It also holds {', '.join(others[-5:])}" + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    return f" (did you mean {best}?{more if others else ''})"


_MISSING = object()
_INT_LIMIT = 1 << 31


def _first(key: str, x: Any) -> Any:
    """The first id of a list (transformers allows several EOS ids), unconverted: the type is checked later."""
    if isinstance(x, (list, tuple)):
        if not x:
            raise ConfigError(f"{key}=[]: needs at least one token id")
        return x[0]
    return x


# Which keys a config file may leave out. A default stands in for a missing key only where the official format
# itself defines it; everywhere else a missing key is a ConfigError, because the defaults of transformers'
# DeepseekV4Config and of the reference's ModelArgs are V4-Flash's sizes (index_topk 512, sliding_window 128,
# routed_scaling_factor 1.5, ...), which silently give another model for any other checkpoint. Defaults stand for:
#  * keys the official inference/config.json leaves to the reference's defaults: norm_eps, hc_eps, n_mtp_layers
#    (the loader also matches the MTP blocks with the checkpoint's mtp.* tensors), max_seq_len (no computation
#    depends on it), bos/eos ids (not part of the model) and csa_ratio (fixed at 4 in the official format);
#  * keys with one valid V4 value: n_shared_experts, score_func (and num_key_value_heads in the hub dialect);
#  * YaRN's beta_fast / beta_slow (32 / 1: YaRN's own defaults, used by transformers and the reference alike);
#  * our own keys: hc_mode (absent: V4's mHC), expert_dtype (informational);
#  * keys no layer uses: the compressed layers' RoPE / YaRN settings when every layer is window-only, the
#    indexer's sizes when no layer is CSA.
_NATIVE_OPTIONAL = {"norm_eps", "hc_eps", "n_mtp_layers", "max_seq_len", "bos_token_id", "eos_token_id", "csa_ratio",
                    "n_shared_experts", "score_func", "beta_fast", "beta_slow", "hc_mode", "expert_dtype"}
_COMPRESSED_ONLY = {"compress_rope_theta", "rope_factor", "original_seq_len"}
_CSA_ONLY = {"index_n_heads", "index_head_dim", "index_topk"}


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
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
# field -> its key in the hub config.json, where the names differ
_HUB_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "norm_eps": "rms_norm_eps",
             "n_heads": "num_attention_heads", "rope_head_dim": "qk_rope_head_dim", "window_size": "sliding_window",
             "rope_factor": "rope_scaling.factor", "original_seq_len": "rope_scaling.original_max_position_embeddings",
             "beta_fast": "rope_scaling.beta_fast", "beta_slow": "rope_scaling.beta_slow",
             "max_seq_len": "max_position_embeddings", "n_activated_experts": "num_experts_per_tok",
             "moe_inter_dim": "moe_intermediate_size", "n_hash_layers": "num_hash_layers", "score_func": "scoring_func",
             "route_scale": "routed_scaling_factor", "n_mtp_layers": "num_nextn_predict_layers",
             "compress_ratios": "compress_ratios or layer_types + compress_rates"}
