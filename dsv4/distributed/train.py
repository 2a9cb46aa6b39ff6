"""Distributed training: the same recipe as `dsv4 train`, on FSDP2 + expert parallelism. Launched by
`torchrun ... -m dsv4.cli.train_distributed`, which takes the flags of `dsv4 train`.

Each rank trains on its rows of the global batch (`--batch-size` is global and must divide by the ranks).
Checkpoints are torch.distributed.checkpoint directories (`OUT/dcp/step_NNNNNNN`, reshardable); the end of
the run also writes `OUT/final/` in the official single-directory format.
"""
from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..model import Transformer
from ..train.config import TrainConfig, use_gpu_kernels
from ..train.losses import LossWeights, compute_loss, expert_loads, update_expert_bias
from ..train.optim import build_optimizers, lr_at
from ..train.trainer import _prepare_data, set_stage, stage_at
from ..train.data import TokenLoader
from .checkpoint import export_official, load_distributed, save_distributed
from .muon import DistributedMuon
from .parallelize import finish_expert_grads, global_expert_loads, init_distributed, parallelize


def _latest(out: str) -> str | None:
    root = os.path.join(out, "dcp")
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []
    return os.path.join(root, steps[-1]) if steps else None


def train_distributed(cfg: TrainConfig, resume: bool = False) -> dict:
    if cfg.cuda_graph == "on":  # distributed steps are not captured: auto means eager here
        raise ConfigError("cuda_graph='on' is for single-GPU `dsv4 train`; distributed training runs eager "
                          "(use auto or off)")
    mesh = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} (global) must be divisible by the {world} ranks")
    # one rank trains the tokenizer and tokenises; the others then read its caches
    prepared = _prepare_data(cfg, cfg.out) if rank == 0 else None
    dist.barrier()
    tok, tok_dir, train_stream, _ = prepared or _prepare_data(cfg, cfg.out)
    mcfg = cfg.model(vocab_size=max(tok.vocab_size, cfg.model().vocab_size))
    device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":  # as dsv4 train: the fp32 islands on TF32 tensor cores unless asked otherwise
        torch.backends.cuda.matmul.allow_tf32 = cfg.fp32_matmul == "tf32"
    use_gpu_kernels(cfg.gpu_kernels)
    model = Transformer(mcfg).init_weights(seed=cfg.seed).to(device).train().set_qat(cfg.qat == "fp4")
    model.set_activation_checkpointing(cfg.activation_checkpointing == "block")
    model = parallelize(model, mesh, bf16=device.type == "cuda")
    opts = build_optimizers(model, cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay,
                            update_rms=cfg.update_rms,
                            muon_cls=DistributedMuon)
    loader = TokenLoader(train_stream, cfg.batch_size, cfg.seq_len, extra=1 + mcfg.n_mtp_layers, seed=cfg.seed)
    weights = LossWeights(mtp=cfg.mtp_weight, indexer_kl=cfg.indexer_kl_weight, balance=cfg.balance_weight)
    step = 0
    ckpt = _latest(cfg.out) if resume else None
    if ckpt:
        step = int(load_distributed(ckpt, model, opts)["step"])
    metrics = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if rank == 0 else None
    t0, tokens = time.perf_counter(), 0
    while step < cfg.steps:
        set_stage(model, stage_at(cfg, step))
        lr = lr_at(step, cfg.steps, cfg.lr, warmup=min(cfg.warmup, cfg.steps), schedule=cfg.schedule,
                   min_ratio=cfg.min_lr_ratio)
        for o in opts:
            for g in o.param_groups:
                g["lr"] = lr
        loads, parts = None, {}
        for micro in range(cfg.grad_accum):
            rows = loader.batch(step * cfg.grad_accum + micro)[rank::world].to(device)
            loss, parts = compute_loss(model, rows, weights, lm=stage_at(cfg, step) != "indexer")
            (loss / cfg.grad_accum).backward()
            m_loads = expert_loads(model)
            loads = m_loads if loads is None else [a + b for a, b in zip(loads, m_loads)]
        finish_expert_grads(model, world)
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.grad_clip)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        update_expert_bias(model, global_expert_loads(loads), cfg.bias_update_speed)
        step += 1
        tokens += cfg.batch_size * cfg.seq_len * cfg.grad_accum
        if step % cfg.log_interval == 0 or step == cfg.steps:
            loss_t = torch.tensor([parts.get("lm", parts["loss"])], device=device)
            dist.all_reduce(loss_t)
            dt = time.perf_counter() - t0
            rec = {"step": step, "tokens": step * cfg.batch_size * cfg.seq_len * cfg.grad_accum,
                   "lm": float(loss_t) / world, "lr": lr, "grad_norm": float(norm), "world": world,
                   "tok_per_s": tokens / dt, "tok_per_s_per_rank": tokens / dt / world}
            if device.type == "cuda":
                rec["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if metrics:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                print(json.dumps(rec), flush=True)
            t0, tokens = time.perf_counter(), 0
        if step % cfg.save_interval == 0 or step == cfg.steps:
            save_distributed(os.path.join(cfg.out, "dcp", f"step_{step:07d}"), model, opts, extra={"step": step})
    export_official(os.path.join(cfg.out, "final"), model, dtype=torch.float32)
    dist.barrier()
    dist.destroy_process_group()
    return {"steps": step}
