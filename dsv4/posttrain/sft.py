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
import os
from contextlib import nullcontext
from dataclasses import asdict
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F

from .. import ops
from ..errors import InvalidArgument
from ..generate.tokenizer import Tokenizer
from ..model import Transformer
from ..model.attention import Attention
from ..train.losses import expert_loads
from ..train.metrics import MetricsLog
from ..train.stages import set_stage
from .buckets import resolve_bucket
from .chat_data import Example, load_examples
from .doc_slots import fit_plan, grow_plan
from .packing import IGNORE, Batch, SFTBatches
from .policy import load_policy, save_policy
from .sft_config import SFTConfig
from .step_inputs import decode, encode
from .step_loop import LossFn, SFTDiverged, StepInput, fit_steps, run_steps

log = logging.getLogger(__name__)

__all__ = ["SFTConfig", "sft_loss", "train_sft", "train_steps", "sft", "SFTDiverged", "fit_steps"]


def _ce(logits_of, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the trained positions and their count, as device tensors. The head runs on
    every position (IGNORE targets add nothing): selecting the trained ones would size a tensor by data, a wait
    for the GPU that a CUDA graph cannot hold."""
    n = (targets != IGNORE).sum()
    logits = logits_of(h)
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="sum"), n


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
    device = next(model.parameters()).device
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    static = cfg.static_on(device)
    bucket = resolve_bucket(cfg.length_bucket, device)
    data = SFTBatches(examples, cfg.batch_size, cfg.seq_len, len(model.mtp), pad, pack=cfg.pack, seed=cfg.seed,
                      bucket=bucket, fixed=static)
    steps = cfg.steps or cfg.epochs * data.batches_per_epoch
    autocast = _autocast(device, cfg.graphs_on(device))
    plan = None
    if static and cfg.pack:   # the first epoch's documents fix the attention slots (doc_slots), with headroom
        plan = fit_plan(([[len(ex.tokens) for ex in row] for row in rows] + [[]] * (cfg.batch_size - len(rows))
                         for rows in data.epoch(0)), data.row_len, cfg.slot_headroom)

    def feed() -> Iterator[StepInput]:
        nonlocal plan
        for batch in data:
            targets, positions = batch.n_targets, batch.tokens.numel()
            if not static:
                yield StepInput(batch, None, targets, positions)
                continue
            encoded, grown = encode(batch, plan), False
            if encoded is None:   # more documents of some length than the slots hold: more slots from now on
                plan = grow_plan(plan, batch.lengths, data.row_len, cfg.slot_headroom)
                encoded, grown = encode(batch, plan), True
                log.info("sft: %d attention slots of %d positions from now on", sum(n for _, n in plan),
                         sum(length * n for length, n in plan))
            yield StepInput(encoded[1], encoded[0], targets, positions, regraph=grown)

    def loss_fn(x, layout) -> dict:
        batch = x if layout is None else decode(x, layout)
        with autocast():
            loss, parts = sft_loss(model, batch, mtp_weight=cfg.mtp_weight, indexer_kl_weight=cfg.indexer_kl_weight)
        return {"loss": loss, **{"part:" + k: v for k, v in parts.items()}, "loads": expert_loads(model)}

    return train_steps(model, tokenizer, feed(), loss_fn, steps, cfg, out, stage="sft", graphs=static and
                       cfg.graphs_on(device), tokenizer_dir=tokenizer_dir)


def train_steps(model: Transformer, tokenizer: Tokenizer, feed: Iterator[StepInput], loss_fn: LossFn, steps: int,
                cfg: SFTConfig, out: str, *, stage: str, graphs: bool, tokenizer_dir: str | None = None) -> dict:
    """run_steps in the sparse attention stage, then save OUT/final/ and plot the loss; the attention layers'
    stage switches are restored. Returns train_sft's dict."""
    os.makedirs(out, exist_ok=True)
    metrics = MetricsLog(os.path.join(out, "metrics.jsonl"))
    metrics.start(0)
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    stage_before = [(m.sparse, m.indexer_loss) for m in layers]
    try:
        set_stage(model, "sparse")
        trained = run_steps(model, feed, loss_fn, steps, cfg, metrics, stage=stage, graphs=graphs)
    finally:
        for m, (sparse, indexer_loss) in zip(layers, stage_before):
            m.sparse, m.indexer_loss = sparse, indexer_loss
    final = save_policy(model, tokenizer, os.path.join(out, "final"), tokenizer_dir=tokenizer_dir)
    plot_sft(metrics.rows, os.path.join(out, "loss.png"))
    lm = [r["lm"] for r in metrics.rows]
    return {"steps": steps, "first_loss": lm[0], "last_loss": lm[-1], "final_dir": final, "trained_tokens": trained}


def _autocast(device: torch.device, graphed: bool) -> Callable[[], ContextManager]:
    """bf16 autocast on a GPU (without its cast cache under graphs: a capture must not keep casts made outside
    it); nothing elsewhere."""
    if device.type != "cuda":
        return nullcontext
    return lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphed)


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
