"""Supervised fine-tuning on chat data: next-token cross-entropy on the assistant's tokens only, plus the MTP loss
on the same tokens (the MTP head keeps predicting what the policy writes, for speculative decoding).

The pieces are dsv4.train's: Muon + AdamW (`build_optimizers`), the warm-up + cosine schedule (`lr_at`),
aux-loss-free expert balancing, the progress bar and metrics.jsonl. Attention is sparse (CSA
attends to the indexer's top-k) and the indexer keeps learning from its KL loss, as in the last pre-training
stage. Output: OUT/metrics.jsonl, OUT/loss.png and OUT/final/ (official format + tokenizer).
"""
from __future__ import annotations

import functools
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..errors import InvalidArgument
from ..generate.tokenizer import Tokenizer
from ..model import Transformer
from ..model.attention import Attention
from ..train.losses import expert_loads, update_expert_bias
from ..train.metrics import MetricsLog
from ..train.optim import build_optimizers, lr_at
from ..train.precision import fp32_matmuls
from ..train.progress import Progress
from ..train.stages import set_stage
from .buckets import resolve_bucket
from .chat_data import Example, load_examples
from .packing import IGNORE, Batch, SFTBatches
from .policy import load_policy, save_policy

log = logging.getLogger(__name__)

__all__ = ["SFTConfig", "sft_loss", "train_sft", "sft", "SFTDiverged"]


class SFTDiverged(RuntimeError):
    """The loss or the gradients became NaN/inf."""


@dataclass(kw_only=True)
class SFTConfig:
    steps: int | None = None      # None: `epochs` passes over the data
    epochs: int = 1
    lr: float = 3e-4
    batch_size: int = 8
    seq_len: int = 512
    pack: bool = True
    thinking: bool = False        # rendering of conversations that do not say
    warmup: int = 5
    min_lr_ratio: float = 0.1
    optimizer: str = "muon"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mtp_weight: float = 0.3
    indexer_kl_weight: float = 1.0
    bias_update_speed: float = 1e-3
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    max_seconds: float = 0.0      # a wall-time cap (0: none) on the steps after the first (the warm-up, whose
                                  # compilation is logged as warmup_s): the schedule shrinks to the steps that fit
    length_bucket: int = 0        # batch lengths rounded up to a multiple of this (buckets.py; 0: 64 on a GPU)

    def check(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise InvalidArgument(f"steps must be >= 1, got {self.steps}")
        if self.seq_len < 2:
            raise InvalidArgument(f"seq_len must be >= 2, got {self.seq_len}")
        if not self.lr > 0:
            raise InvalidArgument(f"lr must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise InvalidArgument(f"warmup must be >= 0, got {self.warmup}")
        if self.length_bucket < 0:
            raise InvalidArgument(f"length_bucket must be >= 0, got {self.length_bucket}")
        if self.optimizer not in ("muon", "adamw"):
            raise InvalidArgument(f"optimizer must be 'muon' or 'adamw', got {self.optimizer!r}")


def _ce(logits_of, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the trained positions (the head runs on those only) and their count."""
    keep = targets != IGNORE
    n = keep.sum()
    if not bool(n):
        return h.new_zeros((), dtype=torch.float32), n
    logits = logits_of(h[keep].unsqueeze(0))[0]
    return F.cross_entropy(logits, targets[keep], reduction="sum"), n


def sft_loss(model: Transformer, batch: Batch, *, mtp_weight: float = 0.3, indexer_kl_weight: float = 1.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean CE over the batch's trained targets + mtp_weight * the MTP heads' mean CE on theirs (+ the indexer's
    KL, whose gradient reaches only the indexer). Returns the total and its detached parts."""
    h = model.hidden(batch.tokens, docs=batch.docs)
    total_ce, n = _ce(model.logits, h, batch.targets)
    lm = total_ce / n.clamp(min=1)
    parts = {"lm": lm.detach()}
    total = lm
    if len(model.mtp) and mtp_weight and batch.mtp_inputs:
        mtp = []
        for k, hk in enumerate(model.mtp_hidden(h, batch.mtp_inputs, docs=batch.docs)):
            summed, count = _ce(functools.partial(_mtp_head, model, k), hk, batch.mtp_targets[k])
            mtp.append(summed / count.clamp(min=1))
        mtp_loss = torch.stack(mtp).mean()
        parts["mtp"] = mtp_loss.detach()
        total = total + mtp_weight * mtp_loss
    kls = [a.indexer_kl for a in model.modules() if isinstance(a, Attention) and a.indexer_kl is not None]
    if kls and indexer_kl_weight:
        kl = torch.stack(kls).mean()
        parts["indexer_kl"] = kl.detach()
        total = total + indexer_kl_weight * kl
    parts["loss"] = total.detach()
    return total, parts


def _mtp_head(model: Transformer, k: int, h: torch.Tensor) -> torch.Tensor:
    """MTP depth k's logits from its lanes (Transformer.mtp_logits' head)."""
    return ops.linear_fp32(model.mtp[k].collapse(h), model.head.weight)


def train_sft(model: Transformer, tokenizer: Tokenizer, examples: list[Example], cfg: SFTConfig, out: str, *,
              tokenizer_dir: str | None = None) -> dict:
    """Fine-tune `model` in place on tokenised conversations; writes metrics.jsonl, loss.png and final/ in `out`.
    Returns {"steps", "first_loss", "last_loss", "final_dir", "trained_tokens"}. The attention layers' stage
    switches are as before when it returns."""
    cfg.check()
    os.makedirs(out, exist_ok=True)
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    bucket = resolve_bucket(cfg.length_bucket, next(model.parameters()).device)
    data = SFTBatches(examples, cfg.batch_size, cfg.seq_len, len(model.mtp), pad, pack=cfg.pack, seed=cfg.seed,
                      bucket=bucket)
    steps = cfg.steps or cfg.epochs * data.batches_per_epoch
    metrics = MetricsLog(os.path.join(out, "metrics.jsonl"))
    metrics.start(0)
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    stage_before = [(m.sparse, m.indexer_loss) for m in layers]
    try:
        set_stage(model, "sparse")
        trained = _loop(model, data, steps, cfg, metrics)
    finally:
        for m, (sparse, indexer_loss) in zip(layers, stage_before):
            m.sparse, m.indexer_loss = sparse, indexer_loss
    final = save_policy(model, tokenizer, os.path.join(out, "final"), tokenizer_dir=tokenizer_dir)
    plot_sft(metrics.rows, os.path.join(out, "loss.png"))
    lm = [r["lm"] for r in metrics.rows]
    return {"steps": steps, "first_loss": lm[0], "last_loss": lm[-1], "final_dir": final, "trained_tokens": trained}


def _loop(model: Transformer, data: SFTBatches, steps: int, cfg: SFTConfig, metrics: MetricsLog) -> int:
    """The optimizer steps; returns the number of trained target tokens."""
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    model.train()
    opts = build_optimizers(model, cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext)
    progress = Progress(steps, 0, show=cfg.progress)
    progress.bar.set_description("sft")
    batches = iter(data)
    trained = 0
    cfg_steps = steps
    start = timed_from = time.perf_counter()   # reset after the warm-up step: the cap counts from there
    with fp32_matmuls("tf32") if device.type == "cuda" else nullcontext():
        for step in range(steps):
            t0 = time.perf_counter()
            lr = lr_at(step, steps, cfg.lr, warmup=min(cfg.warmup, steps), min_ratio=cfg.min_lr_ratio)
            for o in opts:
                for g in o.param_groups:
                    g["lr"] = lr
            batch = next(batches).to(device)
            with autocast():
                loss, parts = sft_loss(model, batch, mtp_weight=cfg.mtp_weight,
                                       indexer_kl_weight=cfg.indexer_kl_weight)
            loss.backward()
            params = [p for p in model.parameters() if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)) if params else 0.0
            values = {k: float(v) for k, v in parts.items()}
            if not math.isfinite(values["loss"]) or not math.isfinite(grad_norm):
                progress.close()
                raise SFTDiverged(f"step {step}: loss={values['loss']} grad_norm={grad_norm} is not finite; stopped")
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
            imbalance = update_expert_bias(model, expert_loads(model), cfg.bias_update_speed)
            n = batch.n_targets
            trained += n
            t1 = time.perf_counter()
            row = {"step": step + 1, "tokens": trained, "lr": lr, "stage": "sft", **values, "grad_norm": grad_norm,
                   "expert_load_max_over_mean": imbalance, "targets": n,
                   "tok_per_s": batch.tokens.numel() / max(t1 - t0, 1e-9)}
            if step == 0:   # compilation and allocation: outside the cap, logged on its own
                row["warmup_s"] = t1 - t0
                start = timed_from = t1
            metrics.add(row)
            progress.step(row)
            if cfg.max_seconds:
                elapsed = time.perf_counter() - start
                if step + 1 == _TIMED_FROM + _TIMED_STEPS:
                    steps = fit_steps(steps, step + 1, elapsed, time.perf_counter() - timed_from, cfg.max_seconds)
                if step + 1 == _TIMED_FROM:
                    timed_from = time.perf_counter()
                if step + 1 >= steps or (step and elapsed > cfg.max_seconds):   # never the warm-up
                    if step + 1 < cfg_steps:
                        log.warning("sft: stopped at step %d of %d for its %.0f s cap", step + 1, cfg_steps,
                                    cfg.max_seconds)
                    break
    progress.close()
    return trained


_TIMED_FROM, _TIMED_STEPS = 2, 5   # steps timed to fit a capped schedule: after the first two (warm-up, allocation)
                                   # (the cap's clock starts after the first)


def fit_steps(steps: int, done: int, elapsed: float, timed: float, max_seconds: float) -> int:
    """The steps of a schedule capped at `max_seconds`: `steps`, or fewer where the rest would not fit at the rate
    of the last `_TIMED_STEPS` steps (`timed` seconds), after `done` steps in `elapsed` seconds. The learning-rate
    schedule then ends (decays fully) within the cap instead of being cut off at a high rate."""
    per_step = timed / _TIMED_STEPS
    return max(done, min(steps, done + int((max_seconds - elapsed) / max(per_step, 1e-9))))


def plot_sft(rows: list[dict], path: str) -> None:
    """The trained tokens' cross-entropy (main head and MTP) against the step."""
    from .curves import plot_metrics
    plot_metrics({"": rows}, [("SFT loss, next token (assistant tokens)", "lm"), ("SFT loss, MTP", "mtp")], path)


def sft(model_dir: str, data: str, out: str, cfg: SFTConfig | None = None, *, overwrite: bool = False) -> dict:
    """`dsv4 sft`: load the base checkpoint and the `.jsonl` conversations, fine-tune, save OUT/final/. An `out`
    holding an earlier run's results is refused unless `overwrite`."""
    cfg = cfg or SFTConfig()
    cfg.check()
    earlier = [n for n in ("final", "metrics.jsonl") if os.path.exists(os.path.join(out, n))]
    if earlier and not overwrite:
        raise InvalidArgument(f"--out {out} already holds a run ({', '.join(earlier)}); choose another directory "
                              "or pass --overwrite")
    model, tokenizer = load_policy(model_dir, cfg.device)
    examples = load_examples(data, tokenizer, thinking=cfg.thinking)
    log.info("%d conversations, %d tokens (%d trained) from %s", len(examples), sum(len(e.tokens) for e in examples),
             sum(sum(e.mask) for e in examples), data)
    result = train_sft(model, tokenizer, examples, cfg, out, tokenizer_dir=model_dir)
    result["config"] = asdict(cfg)
    return result
