"""TrainConfig: every knob of a training run in one place (defaults = the embedded default run).

The defaults train the `tiny` preset on the Python standard library's sources on a CPU in minutes;
ablation switches replace one V4 ingredient at a time by its usual baseline.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, ModelConfig


@dataclass(kw_only=True)
class TrainConfig:
    # model
    preset: str = "tiny"
    model_config: str | None = None         # a config.json (any dialect) instead of a preset
    # data
    data: str | None = None                 # None: the Python standard library's .py sources
    max_corpus_bytes: int = 4_000_000       # for the default corpus (keeps tokenizer training fast)
    tokenizer: str | None = None            # an existing tokenizer.json (default: train a byte-level BPE)
    val_fraction: float = 0.05
    # batch
    steps: int = 160
    time_limit: float | None = None         # minutes: the run ends early, as at its last step (checkpoint, final/,
                                            # sample), once this much wall-clock time has passed; the learning-rate
                                            # schedule stays laid out over `steps`
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    # optimisation
    optimizer: str = "muon"                 # "muon" (V4: Muon for matrices + AdamW) | "adamw" (ablation)
    lr: float = 5e-3
    warmup: int = 20
    schedule: str = "cosine"                # "cosine" | "wsd"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    update_rms: float = 0.18
    grad_clip: float = 1.0
    # V4 recipe
    mtp_weight: float = 0.3
    indexer_kl_weight: float = 1.0
    balance_weight: float = 1e-4
    bias_update_speed: float = 1e-3
    dense_warmup_frac: float = 0.1          # CSA attends to every visible entry, indexer idle
    indexer_warmup_frac: float = 0.05       # dense attention, only the indexer trains (KL loss)
    qat: str = "none"                       # "none" | "fp4" (experts and indexer q/k, straight-through)
    activation_checkpointing: str = "none"  # "none" | "block": recompute each block in backward (long sequences)
    fp32_matmul: str = "tf32"               # GPU fp32 matmuls (attention, compressor, mHC, router, head): "tf32"
                                            # tensor cores (exact on bf16 inputs, fp32 accumulate) | "ieee"
    gpu_kernels: str = "triton"             # GPU training ops: "triton" (fused attention / mHC-mixes kernels;
                                            # H200: 1.21x at 4K, 8.2x at 64K) | "compiled" (torch.compile'd references)
    cuda_graph: str = "auto"                # GPU: "on" captures each stage's fwd+bwd once as a CUDA graph and
                                            # replays it (no per-kernel launch cost; H200 at 4K: 1.29x; not with
                                            # block recompute) | "off" (eager) | "auto": on where it applies (a
                                            # GPU, no block recompute), eager with a warning if capture fails
    # ablations (each swaps one V4 ingredient for its usual baseline)
    attention: str = "v4"                   # "v4" (window/CSA/HCA) | "dense" (full causal attention)
    residual: str = "mhc"                   # "mhc" | "hc" (unconstrained hyper-connections) | "none"
    mtp: int | None = None                  # number of MTP blocks (None: the preset's; 0 disables MTP)
    # bookkeeping
    out: str = "runs/default"
    data_cache: str | None = None           # where tokenized streams are cached (default: OUT/data_cache)
    eval_interval: int = 40
    eval_batches: int = 8
    save_interval: int = 100
    log_interval: int = 10
    seed: int = 0
    device: str = "auto"
    sample_prompt: str = "def fibonacci(n):"
    sample_tokens: int = 64

    def __post_init__(self) -> None:
        choices = {"optimizer": ("muon", "adamw"), "schedule": ("cosine", "wsd"), "qat": ("none", "fp4"),
                   "fp32_matmul": ("tf32", "ieee"), "activation_checkpointing": ("none", "block"),
                   "gpu_kernels": ("compiled", "triton"), "cuda_graph": ("auto", "on", "off"),
                   "attention": ("v4", "dense"), "residual": ("mhc", "hc", "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}: choose one of {allowed}")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_interval", "save_interval",
                     "log_interval", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be positive")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ConfigError(f"time_limit={self.time_limit}: must be positive (minutes)")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr}: must be positive")
        if self.cuda_graph == "on" and self.activation_checkpointing != "none":
            raise ConfigError("cuda_graph='on' is not supported with activation_checkpointing='block'; "
                              "choose one")
        if not 0 <= self.dense_warmup_frac + self.indexer_warmup_frac < 1:
            raise ConfigError("dense_warmup_frac + indexer_warmup_frac must lie in [0, 1)")

    def graphs_on(self, device_type: str) -> bool:
        """Whether training steps on this device run as captured CUDA graphs."""
        return device_type == "cuda" and (self.cuda_graph == "on" or (
            self.cuda_graph == "auto" and self.activation_checkpointing == "none"))

    def model(self, vocab_size: int | None = None) -> ModelConfig:
        """The model config this run trains: preset or file, with the ablation switches applied."""
        cfg = ModelConfig.from_pretrained(self.model_config) if self.model_config else ModelConfig.preset(self.preset)
        n_mtp = cfg.n_mtp_layers if self.mtp is None else self.mtp
        ratios = cfg.compress_ratios[: cfg.n_layers] + (0,) * n_mtp
        changes: dict[str, Any] = {"n_mtp_layers": n_mtp, "compress_ratios": ratios}
        if vocab_size is not None:
            changes["vocab_size"] = vocab_size
        if self.attention == "dense":  # full causal attention: no compression, a window as long as the sequence
            changes.update(compress_ratios=(0,) * (cfg.n_layers + n_mtp), window_size=max(self.seq_len, cfg.window_size))
        if self.residual != "mhc":
            changes.update(hc_mode=self.residual, hc_mult=1 if self.residual == "none" else cfg.hc_mult)
        return cfg.replace(**changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_file(cls, path: str) -> "TrainConfig":
        """A JSON file of TrainConfig fields (unknown keys are an error)."""
        return cls(**cls.read_fields(path))

    @classmethod
    def read_fields(cls, path: str) -> dict[str, Any]:
        """The fields a JSON file sets (unknown keys are an error), without defaults for the others."""
        with open(path) as f:
            d = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown training config keys {unknown}")
        return d

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "train_config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2)


def resolve_config(*, resume: str | None = None, config_file: str | None = None,
                   overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A run's settings, each layer over the one before: defaults < the resumed run's train_config.json (and its
    directory as `out`) < the `config_file` JSON < `overrides` (command-line flags)."""
    fields: dict[str, Any] = {}
    if resume:
        saved = os.path.join(resume, "train_config.json")
        if not os.path.isfile(saved):
            raise FileNotFoundError(f"--resume {resume}: no train_config.json there")
        fields.update(TrainConfig.read_fields(saved), out=resume)
    if config_file:
        fields.update(TrainConfig.read_fields(config_file))
    fields.update(overrides or {})
    return TrainConfig(**fields)
