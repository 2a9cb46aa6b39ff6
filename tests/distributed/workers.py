"""Worker programs for the distributed tests, launched with torchrun (gloo on CPU):

    torchrun --nproc_per_node N tests/distributed/workers.py CASE OUT_DIR
    torchrun --nproc_per_node N tests/distributed/workers.py --batch CASES.json   # [[CASE, OUT_DIR], ...]

Each case writes what the test compares to OUT_DIR/CASE-rank{r}.pt.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import dsv4
from torch.distributed.tensor import DTensor, distribute_tensor

import dsv4.train.step
from dsv4.distributed import (DistributedMuon, DistributedPlacement, export_official, finish_expert_grads,
                              global_expert_loads, init_distributed, load_distributed, load_sharded, parallelize,
                              save_distributed, shard_experts)
from dsv4.train.config import TrainConfig
from dsv4.train.losses import LossWeights, compute_loss, expert_loads, update_expert_bias
from dsv4.train.optim import Muon, build_optimizers
from dsv4.train.trainer import TrainingDiverged, train

# The fp32 rounding sensitivity of a one-process gradient: the largest move over this many embedding perturbations
# of one rounding step each. A tensor of a few elements whose gradient is a sum with cancelling terms (mHC's
# hc_*_scale) moves by a random amount: one sample under-estimates it often (seen 20x under the context-parallel
# error on 2 of 8 cases), the largest of several much less often.
ROUNDING_SAMPLES = int(os.environ.get("DSV4_ROUNDING_SAMPLES", "4"))


def tiny_model(seed: int = 0) -> dsv4.Transformer:
    cfg = dsv4.ModelConfig.preset("tiny")   # 8 routed experts: divisible by 2 and 4 ranks
    return dsv4.Transformer(cfg).init_weights(seed=seed)


def global_batch(step: int, batch: int = 8, seq: int = 40) -> torch.Tensor:
    return torch.randint(0, 2048, (batch, seq + 2), generator=torch.Generator().manual_seed(100 + step))


def train_steps(model, opts, steps: range, rank: int, world: int, distributed: bool) -> list[float]:
    """The V4 step as the single-process trainer does it, on this rank's rows of the global batch."""
    losses = []
    for step in steps:
        batch = global_batch(step)
        rows = batch[rank::world] if distributed else batch
        loss, parts = compute_loss(model, rows, LossWeights())
        loss.backward()
        loads = expert_loads(model)
        if distributed:
            finish_expert_grads(model, world)
            loads = global_expert_loads(loads)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        update_expert_bias(model, loads, 1e-3)
        total = torch.tensor([parts["loss"]])
        if distributed:
            dist.all_reduce(total)
            total /= world
        losses.append(float(total))
    return losses


def case_ep_dispatch(out: str, rank: int, world: int, mesh) -> dict:
    """Tokens differ per rank (training): all-to-all. Tokens equal on all ranks (inference): all-reduce."""
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(13 + rank, 128, generator=g)        # a different number of tokens on each rank
    same = torch.randn(9, 128, generator=torch.Generator().manual_seed(7))
    errs = {}
    for mode, tokens in (("all_to_all", x), ("all_reduce", same)):
        model = tiny_model()
        moe = model.layers[1].ffn
        w, idx, _ = moe.gate(tokens, None)
        want = moe.routed(tokens, idx, w)                 # every expert, locally
        shard_experts(model, mesh, mode=mode)
        assert moe.experts.w1.to_local().shape[0] == 8 // world
        errs[mode] = float(((moe.dispatch(tokens, idx, w) - want).abs().max() / want.abs().max()).detach())
    return errs


def case_train(out: str, rank: int, world: int, mesh) -> dict:
    model = parallelize(tiny_model(), mesh)
    opts = build_optimizers(model, 3e-3, muon_cls=DistributedMuon)
    losses = train_steps(model, opts, range(3), rank, world, distributed=True)
    from dsv4.distributed.checkpoint import full_state_dict
    sd = full_state_dict(model)
    return {"losses": losses, "state": sd if rank == 0 else None}


def case_save(out: str, rank: int, world: int, mesh) -> dict:
    model = parallelize(tiny_model(), mesh)
    opts = build_optimizers(model, 3e-3, muon_cls=DistributedMuon)
    train_steps(model, opts, range(2), rank, world, distributed=True)
    save_distributed(os.path.join(out, "dcp"), model, opts, extra={"step": 2})
    export_official(os.path.join(out, "official"), model, dtype=torch.float32)
    losses = train_steps(model, opts, range(2, 4), rank, world, distributed=True)  # the uninterrupted run
    return {"continued": losses}


def case_load(out: str, rank: int, world: int, mesh) -> dict:
    model = parallelize(tiny_model(seed=9), mesh)            # different init: everything must come from disk
    opts = build_optimizers(model, 3e-3, muon_cls=DistributedMuon)
    extra = load_distributed(os.path.join(out, "dcp"), model, opts)
    losses = train_steps(model, opts, range(2, 4), rank, world, distributed=True)
    return {"step": extra["step"], "resumed": losses}


def muon_update_error(mesh, steps: int = 2) -> float:
    """DistributedMuon on the FSDP + EP tiny model against Muon on the whole model, from the same gradients: the
    largest relative difference of a parameter's total update."""
    whole, placed = tiny_model(), parallelize(tiny_model(), mesh)
    before = {n: p.detach().clone() for n, p in whole.named_parameters()}
    opts = [build_optimizers(m, 3e-3, muon_cls=cls)[0] for m, cls in ((whole, Muon), (placed, DistributedMuon))]
    mine = dict(placed.named_parameters())
    for s in range(steps):
        for i, (name, p) in enumerate(whole.named_parameters()):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * s + i))
            q = mine[name]
            p.grad, q.grad = g, distribute_tensor(g, q.device_mesh, q.placements) if isinstance(q, DTensor) else g
        for o in opts:
            o.step()
    err = 0.0
    for name, p in whole.named_parameters():
        q = mine[name].full_tensor() if isinstance(mine[name], DTensor) else mine[name]
        want = p.detach() - before[name]
        if want.abs().max() > 0:                    # a Muon parameter (AdamW's were not stepped)
            err = max(err, float((q.detach() - before[name] - want).norm() / want.norm()))
    return err


def case_loop(out: str, rank: int, world: int, mesh) -> dict:
    """The training loop on these ranks (config OUT/loop.json), with a NaN loss on the last rank at step 6; and
    DistributedMuon against Muon."""
    result = {"muon_update_error": muon_update_error(mesh)}
    with open(os.path.join(out, "loop.json")) as f:
        cfg = TrainConfig(**json.load(f))
    real, calls = dsv4.train.step.loss_terms, [0]

    def poisoned(model, batch, weights, lm=True):
        loss, parts = real(model, batch, weights, lm=lm)
        calls[0] += 1
        if rank == world - 1 and calls[0] == 7:     # one rank's loss: the stop must reach every rank
            loss = loss * float("nan")
            parts["loss"] = loss.detach()
        return loss, parts
    dsv4.train.step.loss_terms = poisoned
    try:
        train(cfg, placement=DistributedPlacement(mesh))
        result["error"] = None
    except TrainingDiverged as e:
        result["error"] = str(e)
    return result


def case_sharded_inference(out: str, rank: int, world: int, mesh) -> dict:
    """Logits of this rank's part of OUT/ckpt (a whole forward and prefill + decode), with the weights named in
    OUT/weights.txt if it exists (else bf16: dequantised)."""
    path = os.path.join(out, "weights.txt")
    weights = open(path).read().strip() if os.path.isfile(path) else "bf16"
    model = load_sharded(os.path.join(out, "ckpt"), mesh, dtype=torch.float32, weights=weights)
    tokens = torch.randint(0, 2048, (2, 70), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 128)
        inc = torch.cat([model(tokens[:, :50], cache=cache)] + [model(tokens[:, i:i + 1], cache=cache)
                                                                 for i in range(50, 70)], 1)
    return {"logits": full, "incremental": inc}


def cp_model(seed: int = 3) -> dsv4.Transformer:
    """tiny with every kind of attention boundary reachable in a few dozen tokens: window 16, CSA groups of 4
    (top-4 of the indexer), HCA groups of 8; mHC, hash and learned routing, MTP."""
    cfg = dsv4.ModelConfig.preset("tiny").replace(window_size=16, compress_ratios=(0, 4, 8, 4, 0), index_topk=4)
    return dsv4.Transformer(cfg).init_weights(seed=seed, std=0.1)


def cp_objective(model, tokens: torch.Tensor, weights: torch.Tensor, shard) -> torch.Tensor:
    """A scalar of every output of the model: logits and MTP logits weighted by `weights`, plus the indexer KL
    losses. shard(t, shift): this process's positions of [B, T + shift] (all of them in one process)."""
    h = model.hidden(shard(tokens[:, :-1], 0))
    lm = model.logits(h)
    mtp = model.mtp_logits(h, [shard(tokens[:, 1:], 0)])[0]
    kl = sum(a.indexer_kl for a in model.modules() if getattr(a, "indexer_kl", None) is not None)
    return (lm * shard(weights[0], 0)).sum() + (mtp * shard(weights[1], 0)).sum(), lm, kl


def case_cp_exact(out: str, rank: int, world: int, mesh) -> dict:
    """Logits, indexer KL and gradients of context-parallel forwards against this process's whole-sequence
    forward, for the cases in OUT/cp.json ([T, balanced, stage] each, optionally a 4th: the context-parallel model
    recomputes its blocks in the backward pass, activation checkpointing): the largest relative errors, and per
    parameter tensor the gradient's error beside its sensitivity to fp32 rounding: how far the one-process gradient
    moves when the embedding table moves by one rounding step (1e-7 relative, below fp32's 1.2e-7 epsilon)."""
    from dsv4.distributed.context_parallel import ContextParallel
    from dsv4.train.stages import set_stage
    with open(os.path.join(out, "cp.json")) as f:
        cases = json.load(f)
    group = dist.new_group()
    errs = []
    for T, balanced, stage, *recompute in cases:
        g = torch.Generator().manual_seed(T)
        tokens = torch.randint(0, 2048, (2, T + 1), generator=g)
        weights = torch.randn(2, 2, T, 2048, generator=g)

        def one_process(rounding: float, seed: int = 0):
            model = cp_model()
            set_stage(model, stage)
            with torch.no_grad():
                noise = torch.randn(model.embed.weight.shape, generator=torch.Generator().manual_seed(seed))
                model.embed.weight.mul_(1 + rounding * noise)
            loss, lm, kl = cp_objective(model, tokens, weights, lambda t, s: t)
            (loss + kl).backward()
            return model, lm, kl, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        model, lm_one, kl_one, want = one_process(0.0)
        noisy = [one_process(1e-7, seed)[3] for seed in range(ROUNDING_SAMPLES)]
        model.zero_grad(set_to_none=True)
        model.set_activation_checkpointing(bool(recompute and recompute[0]))

        ctx = ContextParallel(group, balanced=balanced)
        model.set_sequence_context(ctx)
        loss, lm, kl = cp_objective(model, tokens, weights, lambda t, s: ctx.shard(t, T))
        (loss + kl / world).backward()      # every rank holds the whole KL: the ranks' objectives sum to one's
        err = {"logits": rel(lm, ctx.shard(lm_one, T)), "kl": rel(torch.as_tensor(kl), torch.as_tensor(kl_one)),
               "kl_value": float(kl_one)}
        grads = {}
        for n, p in model.named_parameters():     # (a rank may leave a parameter without a gradient: none routed)
            grads[n] = torch.zeros_like(p) if p.grad is None else p.grad
            dist.all_reduce(grads[n])
        assert all(not grads[n].any() for n in grads.keys() - want.keys())
        err["grads"] = {n: (rel(grads[n], want[n]), max(rel(x[n], want[n]) for x in noisy)) for n in want}
        # (FSDP2 reduces only the parameters that have a gradient: every rank must have the same ones)
        err["with_grad"] = sorted(n for n, p in model.named_parameters() if p.grad is not None)
        errs.append({"T": T, "balanced": balanced, "stage": stage, **err})
    return {"errors": errs}


def case_fsdp_recompute(out: str, rank: int, world: int, mesh) -> dict:
    """The trainer's indexer warm-up step, then its sparse step, with block recompute under FSDP2 and expert
    parallelism over every rank: "cp", each sequence split across the ranks (ContextParallelPlacement, --cp
    `world`); "dp", each rank its own rows (DistributedPlacement). Against one process's steps without recompute on
    the whole batch: per placement and stage the loss (the mean over ranks) and per parameter tensor the gradient's
    largest relative error beside its sensitivity to fp32 rounding (as case_cp_exact). No optimizer steps."""
    from dsv4.distributed.train import ContextParallelPlacement
    from dsv4.train.stages import set_stage
    stages = [("indexer", 24), ("sparse", 24)]      # --cp 2 balanced: chunks of 6, rows from the other rank's chunks
    weights = LossWeights()

    def batch(T: int, stage: str) -> torch.Tensor:      # [B, T + 1 + n_mtp]
        return torch.randint(0, 2048, (world, T + 2), generator=torch.Generator().manual_seed(T + len(stage)))

    def one_process(rounding: float, seed: int = 0) -> tuple[list[float], list[dict]]:
        model = cp_model()
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            model.embed.weight.mul_(1 + rounding * torch.randn(model.embed.weight.shape, generator=g))
        losses, grads = [], []
        for stage, T in stages:
            set_stage(model, stage)
            loss, _ = compute_loss(model, batch(T, stage), weights, lm=stage != "indexer")
            loss.backward()
            losses.append(float(loss))
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            model.zero_grad(set_to_none=True)
        return losses, grads
    want_losses, want = one_process(0.0)
    samples = [one_process(1e-7, seed)[1] for seed in range(ROUNDING_SAMPLES)]
    noisy = [{n: max(rel(s[i][n], want[i][n]) for s in samples) for n in want[i]} for i in range(len(stages))]

    errs = []
    for name, placement in (("cp", ContextParallelPlacement(mesh, world)), ("dp", DistributedPlacement(mesh))):
        model = placement.place(cp_model().set_activation_checkpointing(True))
        for (stage, T), wanted, noise, want_loss in zip(stages, want, noisy, want_losses):
            set_stage(model, stage)
            loss, _ = compute_loss(model, placement.rows(batch(T, stage)), weights, lm=stage != "indexer")
            loss.backward()
            placement.finish_grads(model)
            mean_loss = float(placement.all_reduce(loss.detach().reshape(1), "mean"))
            grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                     for n, p in model.named_parameters() if p.grad is not None}
            errs.append({"placement": name, "stage": stage, "values": (mean_loss, want_loss),
                         "loss": rel(torch.tensor(mean_loss), torch.tensor(want_loss)),
                         "missing": sorted(wanted.keys() - grads.keys()),
                         "extra": sorted(grads.keys() - wanted.keys()),
                         "grads": {n: (rel(grads[n], wanted[n]), noise[n])
                                   for n in wanted.keys() & grads.keys()}})
            model.zero_grad(set_to_none=True)
    return {"errors": errs}


def case_cp_prefill(out: str, rank: int, world: int, mesh) -> dict:
    """For each [T, balanced] in OUT/prefill.json: the last prompt logits and 3 decode steps' logits after a
    context-parallel prefill of T tokens, against one process's prefill and decode (largest relative errors)."""
    from dsv4.distributed import ContextParallel, context_parallel_prefill
    with open(os.path.join(out, "prefill.json")) as f:
        cases = json.load(f)
    group, errs = dist.new_group(), []
    model = cp_model().eval()
    for T, balanced in cases:
        tokens = torch.randint(0, 2048, (2, T + 3), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            one = model.new_cache(2, 64)
            want = [model(tokens[:, :T], cache=one)[:, -1:]] + [model(tokens[:, t:t + 1], cache=one)
                                                                  for t in range(T, T + 3)]
            cache = model.new_cache(2, 64)
            got = [context_parallel_prefill(model, tokens[:, :T], cache, ContextParallel(group, balanced=balanced))]
            assert model.sequence_context is None and cache.lengths() == [T, T]
            got += [model(tokens[:, t:t + 1], cache=cache) for t in range(T, T + 3)]
        errs.append([rel(g, w) for g, w in zip(got, want)])
    return {"errors": errs}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30))


def run_case(case: str, out: str, rank: int, world: int, mesh) -> None:
    """One case from a fresh global seed, with dsv4.train.step.loss_terms restored after it (case_loop patches
    it), its result saved to OUT/CASE-rank{rank}.pt."""
    torch.manual_seed(0)
    loss_terms = dsv4.train.step.loss_terms
    try:
        result = globals()[f"case_{case}"](out, rank, world, mesh)
    finally:
        dsv4.train.step.loss_terms = loss_terms
    torch.save(result, os.path.join(out, f"{case}-rank{rank}.pt"))


if __name__ == "__main__":
    if sys.argv[1] == "--batch":        # a JSON list of [CASE, OUT_DIR], run in order in this one launch
        with open(sys.argv[2]) as f:
            cases = json.load(f)
    else:
        cases = [sys.argv[1:3]]
    mesh = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    for case, out in cases:
        run_case(case, out, rank, world, mesh)
    dist.barrier()
    dist.destroy_process_group()
