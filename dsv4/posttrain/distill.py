"""Multi-teacher on-policy distillation (OPD, the V4 recipe's last post-training step), and its off-policy
baseline in the same harness.

OPD, per step: draw `batch_prompts` problems spread evenly over the domains; the student samples one completion
for each; the teacher of each problem's domain scores the student's tokens; the loss is the exact
full-vocabulary reverse KL(student || teacher) at every policy token, averaged over the batch's policy tokens.
The student's MTP block keeps training on the same trajectories: `mtp_weight` x the mean cross-entropy of its
predictions of the policy tokens, computed on the trunk's lanes detached, so the trunk's objective stays the
reverse KL alone and the MTP head follows the student's own distribution (what speculative decoding drafts).

Off-policy baseline (`off_policy=True`): each domain's teacher samples the completions, and the student trains
with cross-entropy on the teacher's tokens (SFT on teacher samples), plus the same MTP term. Same prompts per
step, same number of updates, same token budget per completion: equal student updates; the student tokens
trained on are counted in `student_tokens` for both.

Every `eval_every` steps (and before the first and after the last): per domain, greedy completions of held-out
problems, their accuracy and mean reward, and the reverse KL to the domain's teacher on them.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidArgument
from ..generate.tokenizer import Tokenizer
from ..model import Transformer
from ..train.metrics import MetricsLog
from ..train.optim import build_optimizers, lr_at
from ..train.progress import Progress
from ..generate.host import read_once, to_device
from ..generate.sampling import SamplingConfig
from .buckets import bucketed, resolve_bucket
from .rollout import rollout
from .envs.base import Environment, Problem
from .reverse_kl import DEFAULT_CHUNK, policy_positions, reverse_kl, select_positions
from .trajectory import Trajectory
from .turn_limits import check_max_new_tokens

__all__ = ["DistillConfig", "DistillDiverged", "distill", "Batch", "make_batch", "opd_loss", "ce_loss", "mtp_sums",
           "heldout_eval", "domain_schedule", "sample_trajectories"]


class DistillDiverged(RuntimeError):
    """The loss or the gradients became NaN/inf."""


@dataclass(kw_only=True)
class DistillConfig:
    steps: int = 50
    lr: float = 1e-3
    warmup: int = 0
    batch_prompts: int = 8           # problems per step, spread evenly over the domains
    max_new_tokens: int | dict[str, int] = 64   # per assistant turn: one limit, or one per domain (turn_limits.py)
    temperature: float = 1.0         # the sampler's (student in OPD, teachers off-policy)
    mtp_weight: float = 0.3          # pretraining's LossWeights.mtp
    off_policy: bool = False
    eval_every: int = 10
    eval_prompts: int = 16           # held-out problems per domain
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    optimizer: str = "muon"
    chunk: int = DEFAULT_CHUNK       # positions per head/softmax chunk in the reverse KL and the CE
    thinking: bool = False
    seed: int = 0
    max_seconds: float = 0.0         # stop after the step that passes this much wall time (0: no cap), counted
                                     # from the end of the first step (the warm-up, logged as warmup_s)
    length_bucket: int = 0           # training batch lengths rounded up to a multiple of this (buckets.py; 0: 64
                                     # on a GPU)

    def __post_init__(self) -> None:
        check_max_new_tokens(self.max_new_tokens, "distill")
        for name in ("steps", "batch_prompts", "eval_every", "chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidArgument(f"distill {name}={getattr(self, name)!r}: must be an integer >= 1")
        if self.eval_prompts < 0 or self.warmup < 0 or self.length_bucket < 0:
            raise InvalidArgument(f"distill eval_prompts={self.eval_prompts}, warmup={self.warmup}, "
                                  f"length_bucket={self.length_bucket}: must be >= 0")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise InvalidArgument(f"distill lr={self.lr!r}: must be a finite number > 0")
        if self.temperature < 0 or self.mtp_weight < 0:
            raise InvalidArgument(f"distill temperature={self.temperature}, mtp_weight={self.mtp_weight}: "
                                  "must be >= 0")


@dataclass
class Batch:
    """Trajectories right-padded into tensors. tokens [B, L + n_mtp]: the model reads tokens[:, :L - 1]
    (T = L - 1 positions); position t predicts token t + 1 and MTP depth k predicts token t + k + 2. Padding
    comes after each row's tokens, so (causal model) it changes nothing before them; its mask entries are 0.

    tokens and mask stay on the host (make_batch): the losses find the policy positions and count them there,
    and the model and `device` get what they need sent without a wait, so no selection reads the device."""
    tokens: torch.Tensor
    mask: torch.Tensor               # policy mask, same shape as tokens
    domains: list[str]
    n_mtp: int = 0
    device: torch.device = torch.device("cpu")   # where the model's lanes are

    @property
    def T(self) -> int:
        return self.tokens.shape[1] - 1 - self.n_mtp

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :self.T]

    @property
    def positions(self) -> torch.Tensor:
        """bool [B, T]: positions whose next token is a policy token."""
        return policy_positions(self.mask[:, :self.T + 1])

    def n_positions(self) -> int:
        """The number of policy positions (counted where `mask` is: on the host, no read of the device)."""
        return self.positions.nonzero().shape[0]

    def rows(self, domain: str) -> torch.Tensor:
        return torch.tensor([i for i, d in enumerate(self.domains) if d == domain], dtype=torch.long,
                            device=self.tokens.device)


def make_batch(trajs: Sequence[Trajectory], n_mtp: int, pad_id: int, device: torch.device, bucket: int = 1
               ) -> Batch:
    """The trajectories as a Batch (on the host) for a model on `device`; with a `bucket`, T = L - 1 rounded up
    to a multiple of it (buckets.py)."""
    L = max(len(t.tokens) for t in trajs)
    L = bucketed(L - 1, bucket) + 1 if L > 1 else L
    tokens = torch.full((len(trajs), L + n_mtp), pad_id, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, t in enumerate(trajs):
        tokens[i, :len(t.tokens)] = torch.tensor(t.tokens)
        mask[i, :len(t.tokens)] = torch.tensor(t.policy_mask)
    return Batch(tokens, mask, [t.problem.domain for t in trajs], n_mtp, torch.device(device))


def domain_schedule(domains: Sequence[str], n: int, offset: int) -> list[str]:
    """n domains round-robin from `offset`: every domain gets floor or ceil of n / len(domains) problems."""
    return [domains[(offset + i) % len(domains)] for i in range(n)]


def _split(batch: Batch) -> list[tuple[str, Batch]]:
    """The batch's rows of each domain, as a batch of their own (in order of first appearance)."""
    out = []
    for domain in dict.fromkeys(batch.domains):
        rows = batch.rows(domain)
        out.append((domain, Batch(batch.tokens[rows], batch.mask[rows], [domain] * len(rows), batch.n_mtp,
                                  batch.device)))
    return out


def opd_loss(student: Transformer, teachers: Mapping[str, Transformer], batch: Batch,
             chunk: int = DEFAULT_CHUNK, mtp_weight: float = 0.0, tensors: bool = False
             ) -> tuple[torch.Tensor, dict[str, float] | dict[str, torch.Tensor]]:
    """Token-mean reverse KL over the batch's policy positions, each domain's rows scored by that domain's
    teacher (+ mtp_weight x the MTP loss); and the logged parts: "kl", "kl/<domain>" (token means), "mtp", as
    floats (read in one transfer), or with `tensors` as 0-dim device tensors (nothing read).

    Student and teacher run on the same rows (one domain's), so a teacher equal to the student computes the
    very same numbers and the KL is exactly 0."""
    def term(student_h: torch.Tensor, part: Batch, domain: str) -> torch.Tensor:
        teacher = teachers[domain]
        with torch.no_grad():
            h_t = teacher.hidden(part.inputs)
        return reverse_kl(student, teacher, student_h, h_t, part.positions, chunk)
    return _per_domain_loss(student, batch, term, "kl", mtp_weight, tensors)


def ce_loss(student: Transformer, batch: Batch, chunk: int = DEFAULT_CHUNK, mtp_weight: float = 0.0,
            tensors: bool = False) -> tuple[torch.Tensor, dict[str, float] | dict[str, torch.Tensor]]:
    """Token-mean cross-entropy of the student on the batch's policy tokens (SFT on them), in checkpointed
    chunks of positions (+ mtp_weight x the MTP loss); logged parts "ce", "ce/<domain>", "mtp" (as opd_loss's)."""
    def term(student_h: torch.Tensor, part: Batch, domain: str) -> torch.Tensor:
        pos = part.positions
        hs = select_positions(student_h, pos)
        ts = to_device(part.tokens[:, 1:part.T + 1][pos], student_h.device)
        recompute = torch.is_grad_enabled() and hs.shape[0] > chunk
        out = []
        for s in range(0, hs.shape[0], chunk):
            args = (student, hs[s:s + chunk], ts[s:s + chunk])
            out.append(checkpoint(_token_ce, *args, use_reentrant=False) if recompute else _token_ce(*args))
        return torch.cat(out) if out else student_h.new_zeros(0, dtype=torch.float32)
    return _per_domain_loss(student, batch, term, "ce", mtp_weight, tensors)


def _token_ce(student: Transformer, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student.logits(h.unsqueeze(0))[0], targets, reduction="none")


def _per_domain_loss(student: Transformer, batch: Batch,
                     term: Callable[[torch.Tensor, Batch, str], torch.Tensor], name: str, mtp_weight: float,
                     tensors: bool) -> tuple[torch.Tensor, dict[str, float] | dict[str, torch.Tensor]]:
    """sum over domains of term(student lanes, domain rows) [tokens], / the batch's policy tokens; plus the MTP
    term's sums over the same rows, / its targets. The counts come from the host's mask: nothing is read from
    the device unless the parts are asked for as floats (then once, at the end)."""
    n_tokens = max(batch.n_positions(), 1)
    main = mtp_sum = None
    mtp_count = 0
    parts: dict[str, torch.Tensor] = {}
    for domain, part in _split(batch):
        h = student.hidden(part.inputs)
        per_token = term(h, part, domain)
        main = per_token.sum() if main is None else main + per_token.sum()
        parts[f"{name}/{domain}"] = per_token.detach().mean() if per_token.numel() else h.new_zeros(())
        if mtp_weight and part.n_mtp:
            s, c = mtp_sums(student, part, h)
            mtp_sum, mtp_count = (s if mtp_sum is None else mtp_sum + s), mtp_count + c
    loss = main / n_tokens
    parts[name] = loss.detach()
    if mtp_sum is not None:
        mtp = mtp_sum / max(mtp_count, 1)
        parts["mtp"] = mtp.detach()
        loss = loss + mtp_weight * mtp
    if tensors:
        return loss, parts
    return loss, read_once(parts)


def mtp_sums(student: Transformer, batch: Batch, h: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the MTP depths' predictions of policy tokens, on the trunk's lanes detached (so
    only the MTP block and the embedding and head it shares learn from it), and the number of such targets
    (counted on the host's mask, as the targets are selected there)."""
    T, total, count = batch.T, h.new_zeros((), dtype=torch.float32), 0
    shifted = [to_device(batch.tokens[:, k + 1:T + k + 1], h.device) for k in range(batch.n_mtp)]
    for k, logits in enumerate(student.mtp_logits(h.detach(), shifted)):
        sel = batch.mask[:, k + 2:T + k + 2].bool()
        targets = to_device(batch.tokens[:, k + 2:T + k + 2][sel], h.device)
        total = total + F.cross_entropy(select_positions(logits, sel), targets, reduction="sum")
        count += targets.shape[0]
    return total, count


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


@torch.no_grad()
def heldout_eval(student: Transformer, teachers: Mapping[str, Transformer], tokenizer: Tokenizer,
                 envs: Mapping[str, Environment], n: int, cfg: DistillConfig) -> dict[str, float]:
    """Per domain: greedy accuracy and mean reward of the student on the first `n` held-out problems, its mean
    completion length, and its token-mean reverse KL to the domain's teacher on those completions."""
    out: dict[str, float] = {}
    for domain, env in envs.items():
        problems = env.heldout(n)
        if not problems:
            continue
        trajs = sample_trajectories(student, tokenizer, problems, envs, cfg, temperature=0.0, seed=cfg.seed)
        out[f"heldout_acc/{domain}"] = _mean([float(t.reward.correct) for t in trajs])
        out[f"heldout_reward/{domain}"] = _mean([t.reward.score for t in trajs])
        out[f"heldout_len/{domain}"] = _mean([float(sum(t.policy_mask)) for t in trajs])
        batch = make_batch(trajs, 0, _pad_id(tokenizer), student.embed.weight.device)
        _, parts = opd_loss(student, teachers, batch, cfg.chunk)
        out[f"heldout_kl/{domain}"] = parts[f"kl/{domain}"]
    return out


def _pad_id(tokenizer: Tokenizer) -> int:
    return tokenizer.eos_id if tokenizer.eos_id is not None else 0


def _check_models(student: Transformer, teachers: Mapping[str, Transformer], envs: Mapping[str, Environment],
                  tokenizer: Tokenizer) -> None:
    if not envs:
        raise InvalidArgument("distill needs at least one environment")
    missing = [d for d in envs if d not in teachers]
    if missing:
        raise InvalidArgument(f"no teacher for domain(s) {missing}; teachers are given for {sorted(teachers)}")
    for d, t in teachers.items():
        if t.config.vocab_size != student.config.vocab_size:
            raise InvalidArgument(f"teacher {d!r} has a vocabulary of {t.config.vocab_size}, the student "
                                  f"{student.config.vocab_size}: distillation needs one vocabulary")
        if any(p.requires_grad for p in t.parameters()):
            raise InvalidArgument(f"teacher {d!r} has trainable parameters: freeze it (requires_grad_(False))")
    if tokenizer.vocab_size > student.config.vocab_size:
        raise InvalidArgument(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                              f"vocabulary of {student.config.vocab_size}")


def distill(student: Transformer, teachers: Mapping[str, Transformer], tokenizer: Tokenizer,
            envs: Mapping[str, Environment], cfg: DistillConfig, *, metrics_path: str | None = None,
            progress: bool = True, autocast: Callable[[], object] = nullcontext) -> list[dict]:
    """Train `student` in place by OPD (or, with cfg.off_policy, SFT on teacher samples) over `envs`' domains;
    `teachers[domain]` scores (or writes) that domain's trajectories. Returns the metrics rows (training steps,
    and evaluation rows with `heldout_*` keys), also appended to `metrics_path` when given.

    The update reads nothing from the device until its step is done: at the post-training sizes the host's
    kernel launches take longer than the GPU's work, and each read would make the host wait for the queue to
    drain. Its loss, logged parts and gradient norm are read together after the optimiser step, so a non-finite
    loss or gradient raises DistillDiverged after that step's update (which leaves the weights non-finite)
    rather than before it. The run still stops there: the read comes before the step's metrics row and any
    evaluation, and the callers (distill_run.run_distill, the pipeline's OPD and off-policy stages) save the
    student only after distill returns, so no non-finite weights are evaluated or saved."""
    _check_models(student, teachers, envs, tokenizer)
    domains = list(envs)
    device = student.embed.weight.device
    rng = random.Random(cfg.seed)
    opts = build_optimizers(student, cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay)
    params = [p for p in student.parameters() if p.requires_grad]
    log = MetricsLog(metrics_path or "", write=metrics_path is not None)
    log.start(0)
    mode = "offpolicy" if cfg.off_policy else "opd"
    n_mtp = len(student.mtp) if cfg.mtp_weight else 0
    bar = Progress(cfg.steps, 0, show=progress)
    bar.bar.set_description(mode)
    student_tokens = 0
    bucket = resolve_bucket(cfg.length_bucket, device)
    start = time.perf_counter()

    def evaluate(step: int) -> None:
        if cfg.eval_prompts:
            with autocast():
                log.add({"step": step, "mode": mode, "student_tokens": student_tokens,
                         **heldout_eval(student, teachers, tokenizer, envs, cfg.eval_prompts, cfg)})

    def update(batch: Batch) -> dict[str, float]:
        """One optimiser step on `batch`; its loss, logged parts and grad norm, read in one transfer after the
        step (see distill's doc: a non-finite value is seen after the update it came with)."""
        student.train()
        with autocast():
            if cfg.off_policy:
                loss, parts = ce_loss(student, batch, cfg.chunk, cfg.mtp_weight, tensors=True)
            else:
                loss, parts = opd_loss(student, teachers, batch, cfg.chunk, cfg.mtp_weight, tensors=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        return read_once({"loss": loss.detach(), **parts, "grad_norm": grad_norm})

    evaluate(0)
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg.lr, warmup=min(cfg.warmup, cfg.steps))
        for o in opts:
            for g in o.param_groups:
                g["lr"] = lr
        batch_domains = domain_schedule(domains, cfg.batch_prompts, step * cfg.batch_prompts)
        problems = [envs[d].sample(rng) for d in batch_domains]
        with autocast():
            trajs = _sample(student, teachers, tokenizer, problems, envs, cfg, seed=cfg.seed * 1_000_003 + step)
        batch = make_batch(trajs, n_mtp, _pad_id(tokenizer), device, bucket)
        read = update(batch)
        if not (math.isfinite(read["loss"]) and math.isfinite(read["grad_norm"])):
            bar.close()
            raise DistillDiverged(f"{mode} step {step + 1}: loss={read['loss']} grad_norm={read['grad_norm']} is "
                                  "not finite; stopped after the step's update, before it is logged, evaluated "
                                  "or saved (lower --lr?)")
        n_tok = batch.n_positions()
        student_tokens += n_tok
        row = {"step": step + 1, "mode": mode, "stage": mode, "loss": read["loss"],
               **{k: v for k, v in read.items() if k not in ("loss", "grad_norm")},
               "resp_len": _mean([float(sum(t.policy_mask)) for t in trajs]),
               **{f"resp_len/{d}": _mean([float(sum(t.policy_mask)) for t in trajs if t.problem.domain == d])
                  for d in dict.fromkeys(batch_domains)},
               **{f"reward/{d}": _mean([t.reward.score for t in trajs if t.problem.domain == d])
                  for d in dict.fromkeys(batch_domains)},
               "grad_norm": read["grad_norm"], "lr": lr, "student_tokens": student_tokens,
               "tok_per_s": n_tok / max(time.perf_counter() - t0, 1e-9), "time_s": time.perf_counter() - start}
        if step == 0:   # compilation and allocation: outside the cap, logged on its own
            row["warmup_s"] = time.perf_counter() - t0
            start = time.perf_counter()
        log.add(row)
        bar.step(row)
        over = bool(cfg.max_seconds) and step > 0 and time.perf_counter() - start > cfg.max_seconds
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps or over:
            evaluate(step + 1)
        if over:
            break
    bar.close()
    return log.rows


def _sample(student: Transformer, teachers: Mapping[str, Transformer], tokenizer: Tokenizer,
            problems: list[Problem], envs: Mapping[str, Environment], cfg: DistillConfig, seed: int
            ) -> list[Trajectory]:
    """OPD: the student writes every completion. Off-policy: each domain's teacher writes its problems'."""
    if not cfg.off_policy:
        return sample_trajectories(student, tokenizer, problems, envs, cfg, cfg.temperature, seed)
    out: list[Trajectory | None] = [None] * len(problems)
    for d in dict.fromkeys(p.domain for p in problems):
        idx = [i for i, p in enumerate(problems) if p.domain == d]
        picked = [problems[i] for i in idx]
        for i, t in zip(idx, sample_trajectories(teachers[d], tokenizer, picked, envs, cfg, cfg.temperature, seed)):
            out[i] = t
    return out  # type: ignore[return-value]


def sample_trajectories(model: Transformer, tokenizer: Tokenizer, problems: Sequence[Problem],
                        envs: Mapping[str, Environment], cfg: DistillConfig, temperature: float, seed: int
                        ) -> list[Trajectory]:
    """One trajectory per problem from `model`, scored by its domain's environment: GRPO's rollouts (rollout.py)
    on the direct sampler, one completion each."""
    return rollout(model, tokenizer, problems, envs, group_size=1, sampling=SamplingConfig(temperature=temperature),
                   max_new_tokens=cfg.max_new_tokens, thinking=cfg.thinking, seed=seed, sampler="direct")
