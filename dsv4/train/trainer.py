"""The training loop (no argument parsing: `dsv4 train` builds a TrainConfig and calls `train`).

One step = `grad_accum` micro-batches -> gradient clipping -> Muon + AdamW step at the scheduled lr ->
aux-loss-free bias update. The V4 attention schedule runs by step: dense warm-up (CSA attends to every
visible entry, indexer idle), indexer warm-up (dense attention, only the indexer learns, from its KL
loss), then sparse training (top-k selection, KL kept). Metrics go to `metrics.jsonl` and `loss.png`;
checkpoints (official format + optimizer + loader state) every `save_interval` steps and `final/`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from ..generate import Tokenizer, generate
from ..model import Transformer
from ..model.attention import Attention
from ..model.mhc import residual_gain
from .checkpointing import export, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, use_gpu_kernels
from .data import TokenLoader, cached_tokens, eval_batches, read_documents, split_documents, stdlib_sources
from .cuda_graph import GraphedLoss
from .losses import LossWeights, expert_loads, loss_terms, update_expert_bias
from .optim import build_optimizers, lr_at
from .plots import plot_losses
from .tokenizer import train_bpe

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Loss or gradients became NaN/inf; the last good checkpoint is kept."""


def stage_at(cfg: TrainConfig, step: int) -> str:
    """'dense', 'indexer' or 'sparse' (the V4 indexer schedule, by fraction of the run)."""
    dense_end = round(cfg.dense_warmup_frac * cfg.steps)
    if step < dense_end:
        return "dense"
    if step < dense_end + round(cfg.indexer_warmup_frac * cfg.steps):
        return "indexer"
    return "sparse"


def set_stage(model: Transformer, stage: str) -> None:
    for m in model.modules():
        if isinstance(m, Attention):
            m.sparse = stage == "sparse"
            m.indexer_loss = stage != "dense"


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _prepare_data(cfg: TrainConfig, out: str):
    """Documents -> tokenizer (trained unless given / resumed) -> train and validation token streams."""
    docs = read_documents(cfg.data) if cfg.data else stdlib_sources(cfg.max_corpus_bytes)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.seed)
    tok_dir = os.path.join(out, "tokenizer")
    if cfg.tokenizer:
        tok = Tokenizer.from_dir(cfg.tokenizer)
        os.makedirs(tok_dir, exist_ok=True)
        tok.tok.save(os.path.join(tok_dir, "tokenizer.json"))
    elif os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        tok = Tokenizer.from_dir(tok_dir)
    else:
        vocab = cfg.model().vocab_size
        log.info("training a %d-entry byte-level BPE on %d documents", vocab, len(train_docs))
        tok = train_bpe((d.text for d in train_docs), vocab, tok_dir)
    cache = cfg.data_cache or os.path.join(out, "data_cache")
    return tok, tok_dir, cached_tokens(train_docs, tok, cache), cached_tokens(val_docs, tok, cache)


@torch.no_grad()
def evaluate(model: Transformer, batches: list[torch.Tensor], device, autocast) -> float:
    """Mean next-token cross-entropy on fixed held-out batches."""
    model.eval()
    losses = []
    for b in batches:
        b = b.to(device)
        with autocast():
            logits = model(b[:, :-1])
        losses.append(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten())))
    model.train()
    return sum(losses) / len(losses)


def train(cfg: TrainConfig, resume: str | None = None) -> dict:
    """Run (or continue) a training run in `cfg.out`; returns the final metrics."""
    out = cfg.out
    os.makedirs(out, exist_ok=True)
    cfg.save(out)
    device = _device(cfg)
    graphed = cfg.graphs_on(device.type)
    # (no cast cache in graphs: a capture must not keep casts made outside it)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphed))
                if device.type == "cuda" else nullcontext)
    if device.type == "cuda":  # the fp32 islands' operands come from bf16 activations: TF32 keeps them exact
        torch.backends.cuda.matmul.allow_tf32 = cfg.fp32_matmul == "tf32"
    use_gpu_kernels(cfg.gpu_kernels)
    torch.manual_seed(cfg.seed)

    tok, tok_dir, train_stream, val_stream = _prepare_data(cfg, out)
    mcfg = cfg.model(vocab_size=max(tok.vocab_size, cfg.model().vocab_size))
    model = Transformer(mcfg).init_weights(seed=cfg.seed).to(device).train().set_qat(cfg.qat == "fp4")
    model.set_activation_checkpointing(cfg.activation_checkpointing == "block")
    opts = build_optimizers(model, cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay,
                            update_rms=cfg.update_rms)
    extra = 1 + mcfg.n_mtp_layers
    loader = TokenLoader(train_stream, cfg.batch_size, cfg.seq_len, extra=extra, seed=cfg.seed)
    val = eval_batches(val_stream, cfg.batch_size, cfg.seq_len, 1, cfg.eval_batches)
    weights = LossWeights(mtp=cfg.mtp_weight, indexer_kl=cfg.indexer_kl_weight, balance=cfg.balance_weight)
    metrics_path = os.path.join(out, "metrics.jsonl")

    step, history = 0, []
    ckpt = latest_checkpoint(resume) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume {resume}: no checkpoints/step_* directory there")
    if ckpt:
        state = load_checkpoint(ckpt, model)
        for o, s in zip(opts, state["optimizers"]):
            o.load_state_dict(s)
        loader.load_state_dict(state["loader"])
        step = state["step"]
        history = [m for m in _read_metrics(metrics_path) if m["step"] <= step]
        log.info("resumed from %s at step %d", ckpt, step)
    _write_metrics(metrics_path, history)

    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    t_last, tokens_since = time.perf_counter(), 0
    last_good = latest_checkpoint(out)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if step == 0:  # the starting point of the validation curve
        rec = {"step": 0, "tokens": 0, "val_loss": evaluate(model, val, device, autocast)}
        history.append(rec)
        _write_metrics(metrics_path, [rec], append=True)
    graph, graph_stage = None, None
    has_indexer = any(hasattr(a, "indexer") for a in model.modules() if isinstance(a, Attention))
    last_val = float("nan")
    while step < cfg.steps:
        stage = stage_at(cfg, step)
        if stage == "indexer" and not has_indexer:  # nothing to warm up (e.g. the dense-attention ablation)
            stage = "sparse"
        set_stage(model, stage)
        lr = lr_at(step, cfg.steps, cfg.lr, warmup=min(cfg.warmup, cfg.steps), schedule=cfg.schedule,
                   min_ratio=cfg.min_lr_ratio)
        for o in opts:
            for g in o.param_groups:
                g["lr"] = lr
        log_now = (step + 1) % cfg.log_interval == 0 or step == 0 or step + 1 == cfg.steps
        for b in model.layers:
            b.record_hc = log_now or graphed  # a graph records what its capture did, so it always records
        batches = [loader.batch(step * cfg.grad_accum + micro).to(device) for micro in range(cfg.grad_accum)]
        if graphed and graph_stage != stage:  # the stages run different computations: one graph each
            if graph is not None:
                graph.release()
            graph = _capture_stage(model, batches[0], weights, stage, cfg, autocast)
            graphed, graph_stage = graph is not None, stage
        if graphed:
            outs = graph(batches)
        else:
            outs = []
            for b in batches:
                outs.append(_step_outputs(model, b, weights, stage, cfg.grad_accum, autocast))
                outs[-1]["loss"].backward()
        parts_sum = {k[5:]: sum(float(o[k]) for o in outs) / cfg.grad_accum for k in outs[0] if k.startswith("part:")}
        loads = [sum(layer) for layer in zip(*(o["loads"] for o in outs))]
        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)) if params else 0.0
        if not math.isfinite(parts_sum["loss"]) or not math.isfinite(grad_norm):
            bar.close()
            raise TrainingDiverged(f"step {step}: loss={parts_sum['loss']} grad_norm={grad_norm} is not finite; "
                                   f"stopped. Last good checkpoint: {last_good or 'none (no step saved yet)'}")
        for o in opts:
            o.step()
            if not graphed:  # a graph's replays overwrite its gradients where they are
                o.zero_grad(set_to_none=True)
        imbalance = update_expert_bias(model, loads, cfg.bias_update_speed) if stage != "indexer" else 1.0
        step += 1
        tokens_since += tokens_per_step
        bar.update(1)
        if log_now:
            dt = time.perf_counter() - t_last
            rec = {"step": step, "tokens": step * tokens_per_step, "lr": lr, "stage": stage, **parts_sum,
                   "grad_norm": grad_norm, "expert_load_max_over_mean": imbalance,
                   "mhc_gain": residual_gain(outs[-1]["combs"]),
                   "tok_per_s": tokens_since / dt}
            if device.type == "cuda":
                rec["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                rec["val_loss"] = last_val = evaluate(model, val, device, autocast)
            history.append(rec)
            _write_metrics(metrics_path, [rec], append=True)
            # the stage names the loss: the indexer warm-up's is its KL to the attention, not the LM loss
            bar.set_postfix(stage=stage, loss=f"{parts_sum.get('lm', parts_sum['loss']):.3f}",
                            val=f"{last_val:.3f}", tok_s=f"{rec['tok_per_s']:.0f}")
            t_last, tokens_since = time.perf_counter(), 0
        elif step % cfg.eval_interval == 0:
            last_val = evaluate(model, val, device, autocast)
            rec = {"step": step, "tokens": step * tokens_per_step, "val_loss": last_val}
            history.append(rec)
            _write_metrics(metrics_path, [rec], append=True)
        if step % cfg.save_interval == 0 or step == cfg.steps:
            state = {"step": step, "optimizers": [o.state_dict() for o in opts], "loader": loader.state_dict(),
                     "train_config": cfg.to_dict()}
            last_good = save_checkpoint(out, model, tok_dir, state)
    bar.close()
    if graph is not None:
        graph.release()
    for b in model.layers:
        b.record_hc = False
    final = os.path.join(out, "final")
    export(model, final, tok_dir, dtype=torch.float32)
    plot_losses({os.path.basename(os.path.normpath(out)): history}, os.path.join(out, "loss.png"))
    result = {"steps": step, "params": n_params, "final_dir": final,
              "val_loss": next((m["val_loss"] for m in reversed(history) if "val_loss" in m), None),
              "first_val_loss": next((m["val_loss"] for m in history if "val_loss" in m), None)}
    if cfg.sample_prompt and cfg.sample_tokens:
        model.eval()
        ids = tok.encode(cfg.sample_prompt)
        new = generate(model, [ids], cfg.sample_tokens, temperature=0.8, top_k=40, seed=cfg.seed,
                       stop_tokens=[tok.eos_id] if tok.eos_id is not None else [])[0]
        result["sample"] = cfg.sample_prompt + tok.decode([t for t in new if t != tok.eos_id])
    return result


def _capture_stage(model: Transformer, batch: torch.Tensor, weights: LossWeights, stage: str, cfg: TrainConfig,
                   autocast) -> GraphedLoss | None:
    """The stage's step captured as a CUDA graph; None (eager from then on, with a warning) if the capture fails
    and --cuda-graph is auto."""
    log.info("capturing the %s stage's forward + backward as a CUDA graph", stage)
    try:
        return GraphedLoss(lambda b: _step_outputs(model, b, weights, stage, cfg.grad_accum, autocast), batch,
                           list(model.parameters()))
    except RuntimeError as e:
        if cfg.cuda_graph == "on":
            raise
        log.warning("%s; training on without graphs", e)
        return None


def _step_outputs(model: Transformer, batch: torch.Tensor, weights: LossWeights, stage: str, grad_accum: int,
                  autocast) -> dict:
    """One micro-batch's forward, without host syncs (a CUDA graph may capture it): the loss to differentiate
    (scaled for accumulation), its parts ("part:<name>"), the expert loads and the recorded mHC comb matrices."""
    with autocast():
        total, parts = loss_terms(model, batch, weights, lm=stage != "indexer")
    return {"loss": total / grad_accum, **{"part:" + k: v for k, v in parts.items()},
            "loads": expert_loads(model), "combs": [c for b in model.layers for c in b.last_combs]}


def _read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_metrics(path: str, rows: list[dict], append: bool = False) -> None:
    with open(path, "a" if append else "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
