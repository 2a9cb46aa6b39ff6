"""The training loop, one for a single process and for torchrun ranks (no argument parsing: `dsv4 train` builds
a TrainConfig and calls `train`).

One step = `grad_accum` micro-batches -> gradient clipping -> Muon + AdamW step at the scheduled lr ->
aux-loss-free bias update. The attention schedule (dense warm-up, indexer warm-up, sparse) is
dsv4.train.stages. What differs between one process and several (placing the model, this rank's rows of the
batch, reductions over ranks, the checkpoint format) is the Placement's (dsv4.train.placement); the loop
itself makes no torch.distributed call. Metrics go to `metrics.jsonl` and `loss.png`; checkpoints every
`save_interval` steps and the official-format `final/` at the end.
"""
from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext

import torch

from .. import ops
from ..checkpoint import CheckpointError
from ..generate import generate
from ..model import Transformer
from ..model.mhc import residual_gain
from .checkpointing import checkpoint_step
from .config import TrainConfig
from .data import TokenLoader, eval_batches, prepare_data
from .evaluation import evaluate
from .losses import LossWeights, update_expert_bias
from .memory import check_fits, count_params
from .metrics import MetricsLog
from .optim import build_optimizers, lr_at
from .placement import Placement, SingleProcess
from .plots import plot_losses
from .precision import fp32_matmuls
from .progress import Progress
from .run_dir import check_run_dir, clear_run_outputs
from .stages import has_indexer, set_stage, stage_at
from .step import capture_step, step_outputs

log = logging.getLogger(__name__)


def schedule_cut_short(cfg: TrainConfig, end: int, indexer: bool) -> str | None:
    """What a run that ends after `end` of `cfg.steps` steps (a time limit) leaves untrained, or None: the attention
    schedule is laid out by step (`stages.stage_at`), so a run cut before the sparse stage saves a model whose sparse
    attention (top-k by the indexer) never trained, though inference runs it."""
    last = stage_at(cfg, end - 1, indexer=indexer)
    if last == "sparse":
        return None
    first_sparse = next((i for i in range(end, cfg.steps) if stage_at(cfg, i, indexer=indexer) == "sparse"),
                        cfg.steps)
    return (f"the run ends at step {end} of {cfg.steps}, in the {last!r} stage: the sparse stage (top-k attention, "
            f"which inference runs) would start at step {first_sparse} and never trained; pass --steps a number the "
            f"time limit reaches (the stages take fractions of --steps)")

__all__ = ["train", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """Loss or gradients became NaN/inf; the last good checkpoint is kept."""


def train(cfg: TrainConfig, resume: str | None = None, placement: Placement | None = None, *,
          overwrite: bool = False, check_memory: bool = True) -> dict:
    """Run a training run in `cfg.out`, or continue the one in `resume` from its latest intact checkpoint;
    returns the final metrics. `placement`: one process on `cfg.device` by default;
    dsv4.distributed.DistributedPlacement under torchrun.

    A new run refuses a non-empty `cfg.out` unless `overwrite` (which removes the previous run's outputs
    first), and a run that cannot fit in the device's memory unless `check_memory` is False: both before
    anything is written."""
    placement = placement or SingleProcess(cfg.device)
    placement.check(cfg)
    stale = check_run_dir(cfg.out, resume=resume, overwrite=overwrite)
    if check_memory:
        check_fits(cfg, placement.device, placement.world)
    placement.barrier()  # every rank has looked at the directory before the main rank clears it
    if stale and placement.is_main:
        log.info("--overwrite: removing the previous run's %s from %s", ", ".join(stale), cfg.out)
        clear_run_outputs(cfg.out, stale)
    # the fp32 islands' operands come from bf16 activations: TF32 keeps them exact (for this run only)
    # and the GPU training kernels it asked for (the process's choice comes back afterwards)
    with fp32_matmuls(cfg.fp32_matmul) if placement.device.type == "cuda" else nullcontext(), \
            ops.training_kernels(cfg.gpu_kernels):
        return _train(cfg, resume, placement)


def _train(cfg: TrainConfig, resume: str | None, placement: Placement) -> dict:
    out, device = cfg.out, placement.device
    ckpt = None
    if resume:  # found (and verified) before the data and the model are built: nothing to resume fails fast
        ckpt = placement.latest(resume)
        if ckpt is None:
            raise FileNotFoundError(f"--resume {resume}: no {placement.checkpoint_dirs} directory there")
    os.makedirs(out, exist_ok=True)
    graphed = placement.captures_graphs and cfg.graphs_on(device.type)
    # (no cast cache in graphs: a capture must not keep casts made outside it)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphed))
                if device.type == "cuda" and placement.autocasts else nullcontext)
    torch.manual_seed(cfg.seed)

    with placement.main_first():  # the main rank trains the tokenizer and tokenises; the others read its caches
        data = prepare_data(cfg, out)
    mcfg = cfg.model(vocab_size=max(data.tokenizer.vocab_size, cfg.model().vocab_size))
    model = Transformer(mcfg).init_weights(seed=cfg.seed).to(device).train().set_qat(cfg.qat == "fp4")
    model.set_activation_checkpointing(cfg.activation_checkpointing == "block")
    model = placement.place(model)
    opts = build_optimizers(model, cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay,
                            update_rms=cfg.update_rms, muon_cls=placement.muon_cls)
    loader = TokenLoader(data.train, cfg.batch_size, cfg.seq_len, extra=1 + mcfg.n_mtp_layers, seed=cfg.seed)
    val = eval_batches(data.val, cfg.batch_size, cfg.seq_len, 1, cfg.eval_batches)
    weights = LossWeights(mtp=cfg.mtp_weight, indexer_kl=cfg.indexer_kl_weight, balance=cfg.balance_weight)
    metrics = MetricsLog(os.path.join(out, "metrics.jsonl"), write=placement.is_main)

    step = 0
    if ckpt is not None:
        state = placement.load(ckpt, model, opts)
        step = state["step"]
        if step != checkpoint_step(ckpt):
            raise CheckpointError(f"{ckpt}: its training state is at step {step}, not the step its directory "
                                  "is named for")
        loader.load_state_dict(state["loader"])
        log.info("resumed from %s at step %d", ckpt, step)
    if placement.is_main:  # only now: a run that fails to start leaves the directory's config as it was
        cfg.save(out)
    metrics.start(step)

    n_params, n_mtp_params = count_params(mcfg)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    progress = Progress(cfg.steps, step, show=placement.is_main)
    progress.evaluated(next((r["val_loss"] for r in reversed(metrics.rows) if "val_loss" in r), None))
    t_last, tokens_since = time.perf_counter(), 0
    last_good = ckpt
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if step == 0:  # the starting point of the validation curve
        metrics.add({"step": 0, "tokens": 0, "val_loss": evaluate(model, val, placement, autocast)})
        progress.evaluated(metrics.rows[-1]["val_loss"])
    graph, graph_stage = None, None
    indexer = has_indexer(model)
    deadline = None if cfg.time_limit is None else time.monotonic() + 60 * cfg.time_limit
    end = cfg.steps
    while step < end:
        stage = stage_at(cfg, step, indexer=indexer)
        set_stage(model, stage)
        lr = lr_at(step, cfg.steps, cfg.lr, warmup=min(cfg.warmup, cfg.steps), schedule=cfg.schedule,
                   min_ratio=cfg.min_lr_ratio)
        for o in opts:
            for g in o.param_groups:
                g["lr"] = lr
        late = deadline is not None and time.monotonic() >= deadline
        if deadline is not None and _over_ranks(placement, {"late": float(late)}, "max")["late"]:  # ranks agree
            end = step + 1  # this step is the last: it logs, evaluates and saves as the final step does
            log.info("time limit of %g min reached: step %d of %d is the last", cfg.time_limit, end, cfg.steps)
            unfinished = schedule_cut_short(cfg, end, indexer)
            if unfinished:
                log.warning(unfinished)
        log_now = (step + 1) % cfg.log_interval == 0 or step == 0 or step + 1 == end
        for b in model.layers:
            b.record_hc = log_now or graphed  # a graph records what its capture did, so it always records
        batches = [placement.rows(loader.batch(step * cfg.grad_accum + micro)).to(device)
                   for micro in range(cfg.grad_accum)]
        if graphed and graph_stage != stage:  # the stages run different computations: one graph each
            if graph is not None:
                graph.release()
            graph = capture_step(model, batches[0], weights, stage, cfg.grad_accum, autocast,
                                 required=cfg.cuda_graph == "on")
            graphed, graph_stage = graph is not None, stage
        if graphed:
            outs = graph(batches)
        else:
            outs = []
            for b in batches:
                outs.append(step_outputs(model, b, weights, stage, cfg.grad_accum, autocast))
                outs[-1]["loss"].backward()
        placement.finish_grads(model)
        parts = {k[5:]: sum(float(o[k]) for o in outs) / cfg.grad_accum for k in outs[0] if k.startswith("part:")}
        parts = _over_ranks(placement, parts, "mean")
        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)) if params else 0.0
        if not math.isfinite(parts["loss"]) or not math.isfinite(grad_norm):
            progress.close()
            raise TrainingDiverged(f"step {step}: loss={parts['loss']} grad_norm={grad_norm} is not finite; "
                                   f"stopped. Last good checkpoint: {last_good or 'none (no step saved yet)'}")
        for o in opts:
            o.step()
            if not graphed:  # a graph's replays overwrite its gradients where they are
                o.zero_grad(set_to_none=True)
        imbalance = 1.0
        if stage != "indexer":  # the indexer warm-up trains the indexer alone: the routing stays as it is too
            loads = placement.reduce_loads([sum(layer) for layer in zip(*(o["loads"] for o in outs))])
            imbalance = update_expert_bias(model, loads, cfg.bias_update_speed)
        step += 1
        tokens_since += tokens_per_step
        row = None
        if log_now:
            dt = time.perf_counter() - t_last
            gain = _over_ranks(placement, {"mhc_gain": residual_gain(outs[-1]["combs"])}, "max")  # a max over tokens
            row = {"step": step, "tokens": step * tokens_per_step, "lr": lr, "stage": stage, **parts,
                   "grad_norm": grad_norm, "expert_load_max_over_mean": imbalance, **gain,
                   "tok_per_s": tokens_since / dt, "world": placement.world}
            if device.type == "cuda":
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if step % cfg.eval_interval == 0 or step == end:
                row["val_loss"] = evaluate(model, val, placement, autocast)
            metrics.add(row)
            t_last, tokens_since = time.perf_counter(), 0
        elif step % cfg.eval_interval == 0:
            val_loss = evaluate(model, val, placement, autocast)
            metrics.add({"step": step, "tokens": step * tokens_per_step, "val_loss": val_loss})
            progress.evaluated(val_loss)
        progress.step(row)
        if step % cfg.save_interval == 0 or step == end:
            state = {"step": step, "loader": loader.state_dict(), "train_config": cfg.to_dict()}
            last_good = placement.save(out, model, opts, state, data.tokenizer_dir)
    progress.close()
    if graph is not None:
        graph.release()
    for b in model.layers:
        b.record_hc = False

    final = os.path.join(out, "final")
    placement.export(model, final, data.tokenizer_dir)
    if placement.is_main:
        plot_losses({os.path.basename(os.path.normpath(out)): metrics.rows}, os.path.join(out, "loss.png"))
    vals = [m["val_loss"] for m in metrics.rows if "val_loss" in m]
    result = {"steps": step, "params": n_params, "mtp_params": n_mtp_params, "final_dir": final,
              "world": placement.world, "val_loss": vals[-1] if vals else None, "first_val_loss": vals[0] if vals else None}
    sampler = placement.whole_model(model, final) if cfg.sample_prompt and cfg.sample_tokens else None
    if sampler is not None:
        sampler.eval()
        tok = data.tokenizer
        new = generate(sampler, [tok.encode(cfg.sample_prompt)], cfg.sample_tokens, temperature=0.8, top_k=40,
                       seed=cfg.seed, stop_tokens=[tok.eos_id] if tok.eos_id is not None else [])[0]
        result["sample"] = cfg.sample_prompt + tok.decode([t for t in new if t != tok.eos_id])
    placement.barrier()
    return result


def _over_ranks(placement: Placement, values: dict[str, float], op: str) -> dict[str, float]:
    """Logged values combined over ranks (unchanged in one process)."""
    reduced = placement.all_reduce(torch.tensor(list(values.values()), dtype=torch.float64), op)
    return dict(zip(values, reduced.tolist()))
