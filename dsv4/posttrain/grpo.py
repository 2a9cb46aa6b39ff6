"""The GRPO loop: sample problems, roll out G answers each, score them, and take `mu` epochs of clipped
policy-gradient steps over the rollout batch (docs: dsv4/posttrain/grpo_loss.py for the objective).

One step:
  1. `batch_prompts` problems, drawn round-robin from the environments (seeded), G rollouts each on the serving
     engine (or with sampler="direct" the direct sampler; rollout.py), rewards and group-normalised advantages;
  2. the training forward's log-probabilities of the sampled tokens before any update: `old_logp` of the ratio,
     and the train-vs-rollout drift, mean |train logp - rollout logp| over the policy tokens (the numerical gap
     between the sampler and the trainer, which routing replay closes for the routing part); on a GPU the
     training forwards (policy and reference) run under bf16 autocast, as SFT's and OPD's do and as the engine
     samples (`autocast`), while the log-softmax and the loss stay in fp32;
  3. `mu` epochs over the batch in `minibatches` shuffled minibatches: loss, backward, gradient clipping, a Muon
     + AdamW step (dsv4.train.optim); with `beta > 0` a frozen reference model gives the k3 KL term;
  4. one metrics.jsonl row: reward, accuracy, KL, entropy, response length, clip fraction, drift (with routing
     replay also the drift without it), grad norm;
     every `eval_every` steps greedy held-out accuracy per environment.
The aux-loss-free expert bias is not updated during RL (the rollout routing it steers is part of the policy).
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager, Mapping, Sequence

import torch

from ..errors import InvalidArgument
from ..generate.sampling import SamplingConfig
from ..train.metrics import MetricsLog
from ..generate.host import read_once, to_device
from ..train.optim import build_optimizers
from .buckets import resolve_bucket
from .envs.base import Environment
from .grpo_loss import LOSS_TYPES, GRPOLossConfig, group_advantages, grpo_loss
from .logprobs import pad_batch, token_logprobs
from .rollout import SAMPLERS, rollout
from .sft import _autocast
from .trajectory import Trajectory
from .turn_limits import check_max_new_tokens, largest_limit

__all__ = ["GRPOConfig", "GRPOResult", "grpo_train", "train_on_batch", "minibatch_indices", "evaluate_greedy",
           "plot_rewards", "save_policy_dir", "training_autocast"]



@dataclass(kw_only=True)
class GRPOConfig:
    steps: int = 100
    num_generations: int = 8          # G: samples per prompt
    batch_prompts: int = 8            # prompts per step
    lr: float = 1e-5
    optimizer: str = "muon"           # "muon" (Muon + AdamW, as V4 trains) or "adamw"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    beta: float = 0.0                 # KL-to-reference weight (0: no reference model is kept)
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "grpo"           # "grpo" | "dr_grpo"
    mu: int = 1                       # optimisation epochs per rollout batch
    minibatches: int = 1              # minibatches per epoch
    max_new_tokens: int | dict[str, int] = 64   # per assistant turn: one limit, or one per domain (turn_limits.py)
    temperature: float = 1.0
    top_p: float = 1.0
    thinking: bool = False
    routing_replay: bool = False
    sampler: str = "engine"           # rollout.py's: "engine" (the serving engine) or "direct" (no routing replay)
    eval_every: int = 0               # 0: only at the start and the end
    eval_problems: int = 32           # held-out problems per environment
    seed: int = 0
    logprob_chunk: int = 512
    max_seconds: float = 0.0          # stop after the step that passes this much wall time (0: no cap), counted
                                      # from the end of the first step (the warm-up, logged as warmup_s)
    length_bucket: int = 0            # batch lengths rounded up to a multiple of this (buckets.py; 0: 64 on a GPU)
    autocast: bool = True             # the training forwards under bf16 autocast on a GPU (False: fp32 there);
                                      # no effect on the CPU

    def __post_init__(self) -> None:
        check_max_new_tokens(self.max_new_tokens, "GRPO")
        for name in ("steps", "num_generations", "batch_prompts", "mu", "minibatches",
                     "eval_problems", "logprob_chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgument(f"GRPO {name}={v!r}: must be a positive integer")
        if self.length_bucket < 0:
            raise InvalidArgument(f"GRPO length_bucket={self.length_bucket}: must be >= 0")
        if self.loss_type not in LOSS_TYPES:
            raise InvalidArgument(f"GRPO loss_type={self.loss_type!r}: must be one of {LOSS_TYPES}")
        if not self.lr > 0:
            raise InvalidArgument(f"GRPO lr={self.lr}: must be > 0")
        if not self.temperature > 0:
            raise InvalidArgument(f"GRPO temperature={self.temperature}: must be > 0 (rollouts sample)")
        if self.sampler not in SAMPLERS:
            raise InvalidArgument(f"GRPO sampler={self.sampler!r}: must be one of {SAMPLERS}")
        if self.sampler == "direct" and self.routing_replay:
            raise InvalidArgument("GRPO routing replay records the routing on the engine: use sampler='engine'")
        if self.minibatches > self.batch_prompts * self.num_generations:
            raise InvalidArgument(f"GRPO minibatches={self.minibatches}: more than the "
                                  f"{self.batch_prompts * self.num_generations} trajectories of a step")
        self.loss_config()   # refuses inconsistent loss settings (epsilon, beta) here, before any work
        self.sampling()

    def loss_config(self) -> GRPOLossConfig:
        return GRPOLossConfig.for_loss_type(self.loss_type, epsilon=self.epsilon, epsilon_high=self.epsilon_high,
                                            beta=self.beta,
                                            max_len=largest_limit(self.max_new_tokens))

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p)


@dataclass
class GRPOResult:
    rows: list[dict] = field(default_factory=list)          # one per step
    evals: list[dict] = field(default_factory=list)         # held-out accuracy rows


def _policy_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over the policy tokens, as a 0-dim tensor on their device (read later, with the rest)."""
    m = mask.float()
    return (values * m).sum() / m.sum().clamp(min=1)


def evaluate_greedy(model, tokenizer, envs: Mapping[str, Environment], n: int,
                    max_new_tokens: int | Mapping[str, int],
                    thinking: bool = False, sampler: str = "engine") -> dict[str, float]:
    """Held-out accuracy (fraction fully correct) and mean reward per environment, greedy decoding."""
    out = {}
    was_training = model.training
    model.eval()
    try:
        for name, env in envs.items():
            problems = env.heldout(n)
            trajs = rollout(model, tokenizer, problems, {p.domain: env for p in problems}, group_size=1,
                            sampling=SamplingConfig(temperature=0.0), max_new_tokens=max_new_tokens,
                            thinking=thinking, sampler=sampler)
            out[f"eval_acc/{name}"] = sum(t.reward.correct for t in trajs) / len(trajs)
            out[f"eval_reward/{name}"] = sum(t.reward.score for t in trajs) / len(trajs)
    finally:
        model.train(was_training)
    return out


def training_autocast(cfg: GRPOConfig, device: torch.device) -> Callable[[], ContextManager]:
    """The context of GRPO's training forwards: with cfg.autocast, SFT's bf16 autocast on a GPU (with the cast
    cache: GRPO captures no CUDA graphs), which reaches the experts' grouped bf16 kernels rather than the fp32
    reference loop (a host read per MoE layer) and computes as the engine samples; nothing on the CPU."""
    return _autocast(device, graphed=False) if cfg.autocast else nullcontext


def _replay(model, trajectories: Sequence[Trajectory], T: int, on: bool):
    """With routing replay on, the recorded routing for a token_logprobs forward of [len, T] tokens (which runs
    the model over the first T - 1)."""
    if not on:
        return nullcontext()
    from .routing_replay import replaying
    return replaying(model, [t.routing for t in trajectories], T - 1)


def train_on_batch(model, optimizers, params, trajs: Sequence[Trajectory], cfg: GRPOConfig, ref_model=None, *,
                   seed: int = 0, autocast: Callable[[], ContextManager] | None = None) -> dict[str, float]:
    """Steps 2-3 of the module doc on one scored rollout batch (trajectories of one prompt consecutive, G each);
    returns the batch's mean loss, grad norm, clip fraction, entropy, drift (and KL with a reference; with routing
    replay also `drift_unreplayed`, the drift of the same weights routing on their own, for comparison).

    The minibatch loop reads nothing from the device: at these sizes the host's kernel launches take longer than
    the GPU's work, and each read would make the host wait for the queue to drain before launching the next
    minibatch. Every logged value stays a device tensor until one read at the end of the batch. So the gradient
    norm's non-finite check happens there too: a non-finite gradient raises RuntimeError at the end of the batch,
    after that minibatch's update (and the later ones) ran, leaving the model's weights non-finite, rather than
    before the update. The run still stops there: grpo_train calls this before the step's metrics row, any
    evaluation and the save of final/ (and the pipeline's GRPO stage does not catch it), so no non-finite weights
    are evaluated or saved.

    Every forward runs under `autocast()` (default: training_autocast's); the log-probabilities it returns are
    fp32 (token_logprobs), and the loss, ratios and KL are computed from them outside it."""
    device = model.embed.weight.device
    autocast = autocast or training_autocast(cfg, device)
    loss_cfg = cfg.loss_config()
    model.train()
    rewards = torch.tensor([t.reward.score for t in trajs], dtype=torch.float32)
    adv = to_device(group_advantages(rewards, cfg.num_generations, scale=loss_cfg.scale_rewards,
                                      eps=loss_cfg.adv_eps), device)
    batch = pad_batch(trajs, bucket=resolve_bucket(cfg.length_bucket, device))
    tokens = batch.tokens   # on the host: the model checks their range there and sends them without a wait
    batch.mask, batch.old_logp = to_device(batch.mask, device), to_device(batch.old_logp, device)
    T = tokens.shape[1]
    parts = minibatch_indices(len(trajs), cfg.mu, cfg.minibatches, seed)
    on_host = torch.tensor([i for p in parts for i in p]).split([len(p) for p in parts])
    on_device = to_device(torch.cat(on_host), device).split([len(p) for p in parts])
    ref_logp = None
    if ref_model is not None and cfg.beta > 0:
        with torch.no_grad(), autocast():
            ref_logp, _ = token_logprobs(ref_model, tokens, temperature=cfg.temperature,
                                         chunk=cfg.logprob_chunk)
    single = cfg.mu == 1 and cfg.minibatches == 1
    old_logp = None
    if not single:   # the policy before this batch's updates, as the ratio's denominator
        with torch.no_grad(), _replay(model, trajs, T, cfg.routing_replay), autocast():
            old_logp, _ = token_logprobs(model, tokens, temperature=cfg.temperature,
                                         chunk=cfg.logprob_chunk)
    once: dict[str, torch.Tensor] = {}   # values measured once per batch
    if cfg.routing_replay:   # the drift replay removes: the same forward routing on its own
        with torch.no_grad(), autocast():
            free, _ = token_logprobs(model, tokens, temperature=cfg.temperature, chunk=cfg.logprob_chunk)
        once["drift_unreplayed"] = _policy_mean((free - batch.old_logp).abs(), batch.mask)
    acc: dict[str, list[torch.Tensor]] = {"kl": [], "clip_frac": [], "loss": [], "grad_norm": [], "entropy": []}
    for part, host_idx, idx in zip(parts, on_host, on_device):
        with _replay(model, [trajs[i] for i in part], T, cfg.routing_replay), autocast():
            logp, ent = token_logprobs(model, tokens[host_idx], temperature=cfg.temperature,
                                       chunk=cfg.logprob_chunk)
        mask = batch.mask[idx]
        old = logp.detach() if old_logp is None else old_logp[idx]
        if "drift" not in once and single:
            once["drift"] = _policy_mean((logp.detach() - batch.old_logp[idx]).abs(), mask)
        loss, stats = grpo_loss(logp, old, adv[idx], mask, loss_cfg, None if ref_logp is None else ref_logp[idx],
                                tensors=True)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        acc["grad_norm"].append(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        for opt in optimizers:
            opt.step()
        acc["loss"].append(loss.detach())
        acc["clip_frac"].append(stats["clip_frac"])
        acc["entropy"].append(_policy_mean(ent, mask))
        if "kl" in stats:
            acc["kl"].append(stats["kl"])
    if "drift" not in once:
        once["drift"] = _policy_mean((old_logp - batch.old_logp).abs(), batch.mask)
    read = read_once({**{k: v for k, v in acc.items() if v}, **once})
    bad = [i for i, g in enumerate(read["grad_norm"]) if not math.isfinite(g)]
    if bad:
        raise RuntimeError(f"GRPO: non-finite gradient norm in minibatch {bad[0] + 1} of {len(parts)}; stopping "
                           "at the end of the batch")
    out = {k: sum(read[k]) / len(read[k]) for k in acc if acc[k]}
    out.update((k, read[k]) for k in ("drift", "drift_unreplayed") if k in once)
    return out


def minibatch_indices(n: int, mu: int, minibatches: int, seed: int) -> list[list[int]]:
    """Each of `mu` epochs' shuffled minibatches of trajectories 0..n-1 (sorted indices), decided on the host
    before any device work: epoch e's seeded permutation in `minibatches` parts as Tensor.chunk splits it (parts
    of ceil(n / minibatches), the last smaller)."""
    size = -(-n // minibatches)
    out = []
    for epoch in range(mu):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out += [sorted(order[i:i + size]) for i in range(0, n, size)]
    return out


def grpo_train(model, tokenizer, envs: Mapping[str, Environment], cfg: GRPOConfig, out: str | None = None, *,
               ref_model=None, tokenizer_dir: str | None = None, progress: bool = True,
               autocast: Callable[[], ContextManager] | None = None) -> GRPOResult:
    """Train `model` in place with GRPO on `envs` (name -> environment). With `out`, write metrics.jsonl,
    reward.png and final/ (the official checkpoint format, with the tokenizer files of `tokenizer_dir`).
    `ref_model`: the frozen reference for beta > 0 (default: a copy of `model` as it starts); `autocast`: the
    context of the training forwards (default: training_autocast's)."""
    if not envs:
        raise InvalidArgument("GRPO needs at least one environment")
    if cfg.routing_replay and getattr(model, "_checkpoint_blocks", False):
        raise InvalidArgument("routing replay does not support activation checkpointing (the MoE runs in chunks)")
    from tqdm.auto import tqdm
    if cfg.beta > 0 and ref_model is None:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    optimizers = build_optimizers(model, cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    metrics = None
    if out is not None:
        os.makedirs(out, exist_ok=True)
        metrics = MetricsLog(os.path.join(out, "metrics.jsonl"))
        metrics.start(0)
    result = GRPOResult()
    rng = random.Random(cfg.seed)
    names = list(envs)
    bar = tqdm(total=cfg.steps, desc="grpo", unit="step", dynamic_ncols=True, disable=not progress)

    def record(row: dict) -> None:
        if metrics is not None:
            metrics.add(row)

    def run_eval(step: int) -> None:
        row = {"step": step, **evaluate_greedy(model, tokenizer, envs, cfg.eval_problems, cfg.max_new_tokens,
                                               cfg.thinking, cfg.sampler)}
        row["eval_acc"] = sum(v for k, v in row.items() if k.startswith("eval_acc/")) / len(envs)
        result.evals.append(row)
        record(row)

    run_eval(0)
    G = cfg.num_generations
    start = time.perf_counter()
    done = cfg.steps
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        drawn = [envs[names[i % len(names)]] for i in range(cfg.batch_prompts)]
        problems = [env.sample(rng) for env in drawn]
        model.eval()
        trajs = rollout(model, tokenizer, problems, {p.domain: env for p, env in zip(problems, drawn)},
                        group_size=G, sampling=cfg.sampling(), max_new_tokens=cfg.max_new_tokens,
                        thinking=cfg.thinking, record_routing=cfg.routing_replay,
                        seed=cfg.seed * 1_000_003 + step, sampler=cfg.sampler)
        t_roll = time.perf_counter() - t0
        stats = train_on_batch(model, optimizers, params, trajs, cfg, ref_model, seed=cfg.seed * 7919 + step,
                               autocast=autocast)
        rewards = torch.tensor([t.reward.score for t in trajs])
        lengths = [sum(t.policy_mask) for t in trajs]
        row = {"step": step + 1, "reward": float(rewards.mean()), "reward_std": float(rewards.std()) if len(trajs) > 1
               else 0.0, "accuracy": sum(t.reward.correct for t in trajs) / len(trajs),
               "response_len": sum(lengths) / len(lengths),
               "truncated": sum(t.tokens[-1] != tokenizer.eos_id for t in trajs) / len(trajs),
               "lr": cfg.lr, "rollout_s": t_roll, "step_s": time.perf_counter() - t0, **stats}
        if step == 0:   # compilation and allocation: outside the cap, logged on its own
            row["warmup_s"] = row["step_s"]
            start = time.perf_counter()
        result.rows.append(row)
        record(row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.2f}", drift=f"{stats['drift']:.4f}")
        if cfg.max_seconds and step and time.perf_counter() - start > cfg.max_seconds and step + 1 < cfg.steps:
            done = step + 1
            break
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            run_eval(step + 1)
    run_eval(done)
    bar.close()
    model.eval()
    if out is not None:
        plot_rewards(result, os.path.join(out, "reward.png"))
        save_policy_dir(model, tokenizer_dir, os.path.join(out, "final"))
        with open(os.path.join(out, "grpo_config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
    return result


def save_policy_dir(model, tokenizer_dir: str | None, path: str) -> None:
    """The official checkpoint format plus the tokenizer of `tokenizer_dir`, so `dsv4 generate/chat/serve` read
    it (the model alone when there is none)."""
    if tokenizer_dir is None:
        from ..checkpoint import save_model
        save_model(model, path, dtype=model.dtype)
        return
    from ..generate import Tokenizer
    from .policy import save_policy
    save_policy(model, Tokenizer.from_dir(tokenizer_dir), path, tokenizer_dir=tokenizer_dir, dtype=model.dtype)


def plot_rewards(result: GRPOResult, path: str) -> None:
    """Mean rollout reward and accuracy per step, and held-out accuracy where evaluated."""
    from .curves import plot_metrics
    plot_metrics({"rollout": result.rows, "held-out (greedy)": result.evals},
                 [("GRPO reward", "reward"), ("GRPO accuracy", "accuracy"), ("GRPO held-out accuracy", "eval_acc")],
                 path)
