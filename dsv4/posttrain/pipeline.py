"""The whole V4 post-training pipeline at tiny scale, end to end:

  1. base: a byte-level BPE trained on the environments' text and a model size (`model`: a preset or one of
     MODELS) initialised (or a given base); with `pretrain_steps`, next-token pre-training of it on task-rich
     plain text (the domains' problems and solutions, without the chat template: pretrain.py);
  2. SFT on the environments' demonstrations (all domains together);
  3. one GRPO specialist per domain, each from the SFT model, on a fixed pool of that domain's training problems;
  4. the OPD student: the SFT model distilled from the specialists (each prompt scored by its domain's);
  5. the off-policy baseline: the SFT model fine-tuned on the specialists' samples, same steps and prompts;
  6. the mixed-domain GRPO baseline: one GRPO run from the SFT model on every domain at once, by default with the
     specialists' steps summed (the same student rollouts and updates as all specialists together).

Each domain runs at its own difficulty level (`levels`, else `level`): its environment, held-out set,
demonstrations and so its turn limit all come from that one environment object (build_envs).

Each training stage can be capped in wall time (`stage_minutes`: it stops after the step that passes the cap),
counted from the end of its first step: that warm-up (on a GPU mostly compilation) is logged as `warmup_s`, and a
stage its cap stopped before MIN_STEPS steps is flagged (`too_few_steps`). summary.json records every stage's wall
seconds (warm-up included) and, on a GPU, its GPU seconds (one GPU: the same, measured between CUDA
synchronisations).

Every stage writes its directory under OUT (metrics.jsonl, its plot, final/); OUT/summary.md holds the held-out
greedy accuracy of every stage on every domain (one evaluator for all; up to 400 problems per domain, each with its
binomial standard error) and each stage's wall time, then per domain
SFT -> specialist -> OPD student and the specialist's GRPO rollout reward and rollout accuracy at its start and
end; OUT/accuracy.png, reward.png and distill.png draw them. Every rollout and evaluation lets a domain's assistant
turns take the number of tokens derived from its demonstrations (turn_limits.py), unless `max_new_tokens` says. The defaults take about 8 minutes on one CPU thread (7:46 measured with
OMP_NUM_THREADS=1 on an otherwise idle machine: SFT 220 s, the two specialists 91 + 108 s, OPD and the
off-policy baseline 18 + 19 s, evaluation the rest).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .. import ops
from ..config import ModelConfig
from ..errors import InvalidArgument
from ..generate.chat import encode_chat
from ..generate.sampling import SamplingConfig
from ..model import Transformer
from ..train.metrics import read_metrics
from .curves import plot_metrics
from .distill import DistillConfig
from .distill_run import run_distill
from .envs.base import Environment
from .envs.pool import ProblemPool
from .envs.registry import make_env
from .envs.split import LEVELS
from .policy import load_policy, save_policy
from .rollout import SAMPLERS, rollout
from .turn_limits import check_max_new_tokens, turn_limits

__all__ = ["PipelineConfig", "build_envs", "run_pipeline", "evaluate", "demonstrations"]


@dataclass(kw_only=True)
class PipelineConfig:
    envs: tuple[str, ...] = ("math", "instruct")
    level: str = "easy"                   # every domain's difficulty, except those `levels` names
    levels: dict[str, str] = field(default_factory=dict)   # domain -> its own level (`--env code:medium`): the
                                          # environment, its held-out set, demonstrations and turn limit follow it
    thinking: bool = False
    base: str | None = None               # a base checkpoint dir (with tokenizer); None: build a fresh one
    model: str = "tiny"                   # a fresh base's size: a preset (tiny, small) or one of MODELS
    vocab_size: int = 512                 # of the BPE built for a fresh base
    tokenizer_examples: int = 500         # demonstrations per domain the BPE is trained on
    pretrain_steps: int = 0               # next-token pre-training of a fresh base on task-rich text (0: none)
    pretrain_examples: int = 3000         # problems per domain rendered as plain text for it
    pretrain_lr: float = 3e-3
    pretrain_batch_size: int = 32
    pretrain_seq_len: int = 256
    sft_examples: int = 3000              # demonstrations per domain
    sft_steps: int = 600                  # 300 left math at ~0.1 greedy, 600 at ~0.3 (instruct 0.75 -> 0.94)
    sft_lr: float = 3e-3
    sft_batch_size: int = 32
    sft_pack: bool = False                # pack conversations into rows (of the longest one's length) instead of
                                          # one per row padded to it: with the agent's ~450-token conversations
                                          # beside ~20-token math ones, padding is most of an unpacked batch
    # GRPO: small steps over many rollouts, on a fixed pool of problems. At 4 prompts x 8 a step's gradient is
    # mostly noise, which AdamW turns into steps of size lr on every weight: at lr 1e-3 math fell from 0.11 to
    # 0.06. On fresh problems (each seen about once) 32 x 8 at lr 5e-5 to 2e-4 left the rollout reward flat
    # (0.25 -> 0.26 over 40 steps); on a pool of 64 (each seen ~20 times) at 1e-4 it rose 0.25 -> 0.34 (seed 0)
    # and 0.33 -> 0.46 (seed 1). What it learns there is the pool's: held-out math (400 problems, SE 0.023) went
    # 0.265 -> 0.250 with seed 0 and 0.350 -> 0.258 with seed 1; a pool of 128 at 2e-4 rose less and lost more.
    # With seed 1 no remedy kept held-out math at SFT's 0.350 while the reward rose: lr 5e-5 0.283, a KL to the
    # SFT model (beta 0.1) 0.280, Dr. GRPO 0.265; fresh problems (pool 0) kept 0.328 with the reward flat.
    # Easy instruct from an SFT model at 0.50 held-out (tiny, 250 SFT steps; 74 problems, SE 0.058): 40 steps
    # left it at 0.50 on the pool, 0.49 on fresh problems, 0.47 on the pool with a 0/1 reward, while the rollout
    # accuracy rose 0.29 -> 0.39 (pool), 0.29 -> 0.37 (fresh): neither the pool nor the partial credit (reward
    # and accuracy rose together) lowered it at this scale; the failures are the wrong word ("include").
    # Why held-out math falls on fresh problems (bench/results/2026-12-07_cpu_3f6e27f_grpo_lr_noise.txt, tiny, 32 x 8, 4
    # minibatches): independent batches' gradients are nearly orthogonal (mean cosine 0.04, coin-flip rewards
    # 0.08), so each AdamW update is a noise step of about lr on every weight. At lr 3e-4 greedy held-out fell
    # 0.18 -> 0.135 in 12 steps with the rollout reward flat and the entropy falling (the H100 mini run's
    # pattern); coin-flip rewards at the same lr fell as far (0.11), and at 1e-3 both reached 0.073. At 1e-5
    # and 1e-4 nothing moved in 16 (and 40) steps. The same lr moves a wider model's outputs further: one
    # lr-sized noise step on mini at 1e-4 changes the log-probs as much as on tiny at 1e-3 (bench/grpo_step_size.py),
    # so mini's 1e-4 is in the harmful range and ~1e-5 matches tiny's harmless 1e-4 (bench/grpo_variants.py
    # compares settings from one SFT checkpoint, with a coin-flip control).
    grpo_steps: int = 40
    grpo_lr: float = 1e-4
    grpo_generations: int = 8
    grpo_batch_prompts: int = 32
    grpo_minibatches: int = 1             # updates per rollout batch (each on a part of it: the agent's ~470-token
                                          # trajectories x 256 take ~70 GB of fp32 activations for `mini` at once)
    grpo_pool: int = 64                   # each specialist's training problems (envs/pool.py); 0: fresh ones
    opd_steps: int = 20
    opd_lr: float = 1e-4                  # at 3e-4 the student fell below its math teacher (0.22 vs 0.34)
    opd_batch_prompts: int = 16
    off_policy_baseline: bool = True
    mixed_grpo: bool = False              # the mixed-domain GRPO baseline (stage grpo-mixed)
    mixed_grpo_steps: int = 0             # its steps; 0: grpo_steps x domains (equal student compute)
    stage_minutes: float = 0.0            # wall-time cap of each training stage (0: none; the mixed GRPO
                                          # baseline's is a specialist's times the number of domains)
    minutes: dict[str, float] = field(default_factory=dict)   # caps of some stages (pretrain, sft, grpo: each
                                          # specialist, opd, offpolicy, grpo-mixed) instead of stage_minutes
    grpo_eval_problems: int = 0           # held-out problems per domain of GRPO's in-training evaluations
                                          # (0: eval_problems)
    optimizer: str = "adamw"              # every stage's; Muon's Newton-Schulz is half a tiny CPU step's time
    sampler: str = "direct"               # GRPO's rollouts (rollout.py): 256 tiny-model rollouts take 0.8 s on
                                          # the direct sampler, 7.6 s on the engine (which prefills each alone)
    max_new_tokens: int | dict[str, int] | None = None   # tokens per assistant turn in rollouts and evaluations:
                                          # None derives each domain's from its demonstrations (turn_limits.py),
                                          # an int sets every domain's, a dict some domains' (others derived)
    eval_problems: int = 400              # held-out problems per domain for the summary table (fewer where a
                                          # domain has fewer: easy math ~400, easy instruct 74); at 64 the
                                          # binomial std of an accuracy near 0.3 is 0.057, the size of the
                                          # differences between stages; at 400 it is 0.023 (greedy: ~2 s each)
    seed: int = 0
    device: str = "cpu"
    compile: bool = False                 # on a GPU, torch.compile the training ops that have no Triton training
                                          # kernel (ops.training_compile); off: they run eager. Off by default: the
                                          # first H100 run (mini, 0.2-0.5 min caps) spent 43-88 s compiling in the
                                          # first step of each stage, more than each stage's cap, while a small
                                          # model's eager step costs kernel launches, milliseconds
    progress: bool = True
    only: tuple[str, ...] = field(default=())   # run just these stages (others must have run in OUT already)

    def check(self) -> None:
        if not self.envs:
            raise InvalidArgument("posttrain needs at least one environment (--env)")
        twice = sorted({d for d in self.envs if self.envs.count(d) > 1})
        if twice:
            raise InvalidArgument(f"posttrain envs={self.envs}: {', '.join(twice)} given more than once")
        stray = sorted(set(self.levels) - set(self.envs))
        if stray:
            raise InvalidArgument(f"posttrain levels={self.levels}: {', '.join(stray)} not among envs {self.envs}")
        for d, lv in {"(every domain)": self.level, **self.levels}.items():
            if lv not in LEVELS:
                raise InvalidArgument(f"posttrain level {lv!r} for {d}: not one of {', '.join(LEVELS)}")
        check_max_new_tokens(self.max_new_tokens, "posttrain", allow_none=True)
        for name in ("sft_examples", "sft_steps", "grpo_steps", "opd_steps", "eval_problems",
                     "tokenizer_examples", "pretrain_examples", "pretrain_batch_size", "pretrain_seq_len"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"posttrain {name}={getattr(self, name)}: must be >= 1")
        for name in ("pretrain_steps", "mixed_grpo_steps", "stage_minutes", "grpo_eval_problems"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"posttrain {name}={getattr(self, name)}: must be >= 0")
        bad = sorted(set(self.minutes) - set(CAPPED))
        if bad or any(v < 0 for v in self.minutes.values()):
            raise InvalidArgument(f"posttrain minutes={self.minutes}: stages are {', '.join(CAPPED)}, minutes >= 0")
        if self.base is None:
            model_config(self.model, self.vocab_size)      # refuses an unknown size here, before any work
        elif self.pretrain_steps:
            raise InvalidArgument("posttrain pretrain_steps: pre-training is for a fresh base, not a given --base")
        if self.grpo_pool < 0:
            raise InvalidArgument(f"posttrain grpo_pool={self.grpo_pool}: must be >= 0 (0: fresh problems)")
        if self.sampler not in SAMPLERS:
            raise InvalidArgument(f"posttrain sampler={self.sampler!r}: must be one of {SAMPLERS}")

    def env_levels(self) -> dict[str, str]:
        """Each domain's level, in the order of `envs`: its own from `levels`, else `level`."""
        return {d: self.levels.get(d, self.level) for d in self.envs}


def build_envs(cfg: PipelineConfig) -> dict[str, Environment]:
    """Each domain's environment at its own level (cfg.env_levels())."""
    return {d: make_env(d, level=lv) for d, lv in cfg.env_levels().items()}


CAPPED = ("pretrain", "sft", "grpo", "opd", "offpolicy", "grpo-mixed")   # stages a time cap applies to


def stage_cap(cfg: PipelineConfig, stage: str) -> float:
    """Seconds stage `stage` (one of CAPPED) may train; 0: no cap. The mixed GRPO baseline's default is a
    specialist's cap times the domains, the specialists' GPU time together."""
    if stage in cfg.minutes:
        return 60.0 * cfg.minutes[stage]
    if stage == "grpo-mixed":
        return stage_cap(cfg, "grpo") * len(cfg.envs)
    return 60.0 * cfg.stage_minutes


def demonstrations(env: Environment, n: int, rng: random.Random) -> list[dict]:
    """n conversations (OpenAI messages) of fresh problems answered by the environment's solver."""
    return [{"messages": [*p.messages, *env.demonstrate(p)]} for p in (env.sample(rng) for _ in range(n))]


def _write_jsonl(rows: Sequence[dict], path: str) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# Sizes between the presets for the post-training pipeline on one GPU: small's layer pattern (dense first and last
# layers, CSA/HCA alternating), fewer and narrower layers. The vocabulary is the pipeline's BPE either way.
MODELS: dict[str, dict] = {
    # ~0.3M parameters (vocabulary 1K): a fast CPU test of every stage
    "micro": dict(dim=64, n_layers=2, n_heads=2, head_dim=32, rope_head_dim=16, q_lora_rank=32, o_groups=1,
                  o_lora_rank=32, compress_ratios=(0, 4, 0), index_n_heads=4, index_head_dim=16, index_topk=8,
                  n_routed_experts=4, n_activated_experts=2, moe_inter_dim=64, n_hash_layers=0),
    # 28M total / 12M active with a 1K vocabulary (+4.8M MTP): between tiny (2.8M) and small (235M)
    "mini": dict(dim=384, n_layers=6, n_heads=6, head_dim=64, rope_head_dim=32, q_lora_rank=192, o_groups=2,
                 o_lora_rank=192, window_size=64, compress_ratios=(0, 0, 4, 64, 4, 64, 0), index_n_heads=8,
                 index_head_dim=32, index_topk=64, original_seq_len=1024, rope_factor=4.0, n_routed_experts=8,
                 n_activated_experts=2, moe_inter_dim=384, n_hash_layers=1, max_seq_len=8192),
}


def model_config(name: str, vocab_size: int) -> ModelConfig:
    """The model of a fresh base: the preset `name`, or tiny changed by MODELS[name]; vocabulary `vocab_size`."""
    if name in MODELS:
        return dataclasses.replace(ModelConfig.preset("tiny"), **MODELS[name], vocab_size=vocab_size)
    try:
        return dataclasses.replace(ModelConfig.preset(name), vocab_size=vocab_size)
    except Exception as e:
        raise InvalidArgument(f"posttrain model={name!r}: not a preset or one of {sorted(MODELS)} ({e})") from None


def build_base(out: str, texts: Sequence[str], vocab_size: int, seed: int, model: str = "tiny") -> str:
    """A byte-level BPE trained on `texts` and the model size `model` (model_config; its vocabulary cut to the
    tokenizer's), randomly initialised; saved with the tokenizer in `out`."""
    from ..train.tokenizer import train_bpe
    tok = train_bpe(texts, vocab_size, out)
    cfg = model_config(model, tok.vocab_size)
    torch.manual_seed(seed)
    save_policy(Transformer(cfg).init_weights(seed=seed), tok, out)   # writes its tokenizer_config.json
    return out


_SIZES: dict[tuple[int, int], tuple[Environment, int]] = {}   # (id(env), n) -> (env, its heldout_size)


def heldout_size(env: Environment, n: int) -> int:
    """How many held-out problems `env` gives when asked for up to n: n, or all it has when it has fewer
    (found by bisection: `heldout` refuses a request beyond its set; remembered per environment, since a refusal
    can take seconds: the code environment draws 5,000 problems before it gives up)."""
    known = _SIZES.get((id(env), n))
    if known is not None and known[0] is env:
        return known[1]
    size = _heldout_size(env, n)
    _SIZES[(id(env), n)] = (env, size)
    return size


def _heldout_size(env: Environment, n: int) -> int:
    try:
        return len(env.heldout(n))
    except InvalidArgument:
        pass
    lo, hi = 0, n                     # heldout(lo) succeeds, heldout(hi) refuses
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            env.heldout(mid)
            lo = mid
        except InvalidArgument:
            hi = mid
    return lo


@torch.no_grad()
def evaluate(model_dir: str, envs: Mapping[str, Environment], n: int, max_new_tokens: int | Mapping[str, int],
             thinking: bool, device: torch.device) -> dict[str, float]:
    """Greedy held-out accuracy (fraction fully correct) of a checkpoint on each domain's first n problems (all of
    them where a domain has fewer)."""
    model, tokenizer = load_policy(model_dir, device)
    out = {}
    for name, env in envs.items():
        trajs = rollout(model, tokenizer, env.heldout(heldout_size(env, n)), envs, group_size=1, sampling=SamplingConfig(temperature=0.0),
                        max_new_tokens=max_new_tokens, thinking=thinking, sampler="direct")
        out[name] = sum(t.reward.correct for t in trajs) / max(len(trajs), 1)
    return out


def _longest(tokenizer_dir: str, data: str, thinking: bool) -> int:
    """Tokens in the longest conversation of `data`: SFT rows (one conversation each) are padded to it."""
    from ..generate.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(tokenizer_dir)
    with open(data) as f:
        return max(len(tok.encode(encode_chat(json.loads(line)["messages"], thinking))) for line in f)


class _Stages:
    """Runs the stages in order, timing each; a stage not in `only` (when given) is taken from OUT as it is.
    On a GPU each stage's time is taken between CUDA synchronisations, so it is the stage's GPU time too."""

    def __init__(self, out: str, only: Sequence[str], device: torch.device | None = None):
        self.out, self.only, self.seconds = out, set(only), {}
        self.cuda = device is not None and device.type == "cuda"

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, name: str, fn: Callable[[str], str]) -> str:
        """fn(stage dir) -> the stage's checkpoint dir."""
        d = os.path.join(self.out, name)
        final = os.path.join(d, "final")
        if self.only and name not in self.only:
            if not os.path.isdir(final):
                raise InvalidArgument(f"stage {name!r} is not asked for (--only) and {final} does not exist")
            return final
        os.makedirs(d, exist_ok=True)
        self._sync()
        t0 = time.perf_counter()
        result = fn(d)
        self._sync()
        self.seconds[name] = time.perf_counter() - t0
        return result

    def timed(self, name: str, fn: Callable[[], object]):
        """fn() timed as the step `name` (not a stage with a directory: the evaluation)."""
        self._sync()
        t0 = time.perf_counter()
        result = fn()
        self._sync()
        self.seconds[name] = time.perf_counter() - t0
        return result

    def gpu_seconds(self) -> dict[str, float]:
        """Each stage's GPU seconds: its time on the one GPU it ran on; none on the CPU."""
        return dict(self.seconds) if self.cuda else {}


def run_pipeline(out: str, cfg: PipelineConfig) -> dict:
    """Run the pipeline into `out`; returns the summary (also OUT/summary.json and OUT/summary.md)."""
    cfg.check()
    with ops.training_compile(cfg.compile):
        return _run_pipeline(out, cfg)


def _run_pipeline(out: str, cfg: PipelineConfig) -> dict:
    from ..generate.tokenizer import Tokenizer
    from .grpo import GRPOConfig, grpo_train
    from .pretrain import pretrain
    from .sft import SFTConfig, sft

    os.makedirs(out, exist_ok=True)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    envs = build_envs(cfg)
    rng = random.Random(cfg.seed)
    stages = _Stages(out, cfg.only, device)
    start = time.perf_counter()

    def base_stage(d: str) -> str:
        if cfg.base is not None:
            return cfg.base
        texts = [encode_chat(c["messages"], cfg.thinking) for env in envs.values()
                 for c in demonstrations(env, cfg.tokenizer_examples, random.Random(cfg.seed + 1))]
        from .pretrain import plain_text
        texts += [plain_text(c["messages"]) for env in envs.values()
                  for c in demonstrations(env, cfg.tokenizer_examples // 4 if cfg.pretrain_steps else 0,
                                          random.Random(cfg.seed + 2))]
        return build_base(os.path.join(d, "final"), texts, cfg.vocab_size, cfg.seed, cfg.model)

    def pretrain_stage(d: str) -> str:
        model, tokenizer = load_policy(base, device)
        res = pretrain(model, tokenizer, envs, cfg.pretrain_examples,
                       SFTConfig(steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, batch_size=cfg.pretrain_batch_size,
                                 seq_len=cfg.pretrain_seq_len, optimizer=cfg.optimizer, seed=cfg.seed,
                                 device=str(device), progress=cfg.progress,
                                 max_seconds=stage_cap(cfg, "pretrain")),
                       d, tokenizer_dir=base, seed=cfg.seed + 3)
        return res["final_dir"]

    def sft_stage(d: str) -> str:
        data = os.path.join(d, "data.jsonl")
        _write_jsonl([c for env in envs.values() for c in demonstrations(env, cfg.sft_examples, rng)], data)
        res = sft(base, data, d, SFTConfig(steps=cfg.sft_steps, lr=cfg.sft_lr, batch_size=cfg.sft_batch_size,
                                           seq_len=_longest(base, data, cfg.thinking), pack=cfg.sft_pack,
                                           optimizer=cfg.optimizer, thinking=cfg.thinking, seed=cfg.seed,
                                           device=str(device), progress=cfg.progress,
                                           max_seconds=stage_cap(cfg, "sft")),
                  overwrite=True)
        return res["final_dir"]

    def grpo_stage(domains: Sequence[str], steps: int, cap: float) -> Callable[[str], str]:
        n_eval = cfg.grpo_eval_problems or cfg.eval_problems
        def fn(d: str) -> str:
            model, tokenizer = load_policy(sft_dir, device)
            gcfg = GRPOConfig(steps=steps, num_generations=cfg.grpo_generations, lr=cfg.grpo_lr,
                              minibatches=cfg.grpo_minibatches,
                              batch_prompts=cfg.grpo_batch_prompts, max_new_tokens={x: limits[x] for x in domains},
                              thinking=cfg.thinking,
                              eval_problems=max(min(heldout_size(envs[x], n_eval) for x in domains), 1),
                              eval_every=max(steps // 4, 1), seed=cfg.seed, optimizer=cfg.optimizer,
                              sampler=cfg.sampler, max_seconds=cap)
            train_envs = {x: envs[x] if not cfg.grpo_pool else ProblemPool(envs[x], cfg.grpo_pool, seed=cfg.seed)
                          for x in domains}
            grpo_train(model, tokenizer, train_envs, gcfg, d, tokenizer_dir=sft_dir, progress=cfg.progress)
            return os.path.join(d, "final")
        return fn

    def distill_stage(off_policy: bool, steps: int) -> Callable[[str], str]:
        def fn(d: str) -> str:
            dcfg = DistillConfig(steps=steps, lr=cfg.opd_lr, batch_prompts=cfg.opd_batch_prompts,
                                 max_new_tokens=dict(limits), off_policy=off_policy, thinking=cfg.thinking,
                                 eval_every=max(steps // 4, 1), eval_prompts=min(cfg.eval_problems, 16),
                                 optimizer=cfg.optimizer, seed=cfg.seed,
                                 max_seconds=stage_cap(cfg, "offpolicy" if off_policy else "opd"))
            return run_distill(sft_dir, specialists, list(envs), d, dcfg, device=str(device),
                               progress=cfg.progress, envs=envs)["final_dir"]
        return fn

    checkpoints: dict[str, str] = {}
    table: dict[str, dict[str, float]] = {}
    specialists: dict[str, str] = {}

    def done(name: str, path: str) -> str:
        """A finished stage: evaluate its checkpoint (timed as "eval") and rewrite the summary, so a run stopped
        later still leaves the table of what it finished."""
        checkpoints[name] = path
        t0 = stages.seconds.get("eval", 0.0)
        table[name] = stages.timed("eval", lambda: evaluate(path, envs, cfg.eval_problems, limits,
                                                            cfg.thinking, device))
        stages.seconds["eval"] += t0
        write_summary()
        return path

    def write_summary() -> dict:
        summary = {"config": dataclasses.asdict(cfg), "levels": cfg.env_levels(), "accuracy": table, "seconds": stages.seconds,
                   "gpu_seconds": stages.gpu_seconds(), "device": _device_name(device),
                   "heldout_n": {d: heldout_size(env, cfg.eval_problems) for d, env in envs.items()},
                   "steps": {name: _steps_done(path) for name, path in checkpoints.items() if name != "base"},
                   "grpo_reward": {d: grpo_reward_change(read_metrics(os.path.join(os.path.dirname(p),
                                                                                   "metrics.jsonl")))
                                   for d, p in specialists.items()},
                   "turn_limits": limits,
                   "total_seconds": time.perf_counter() - start, "checkpoints": checkpoints}
        if cfg.pretrain_steps:
            summary["steps"]["pretrain"] = _steps_done(base)
        trained = [*([("pretrain", base)] if cfg.pretrain_steps else []), *checkpoints.items()]
        summary["warmup_s"] = {name: w for name, path in trained
                               if name != "base" and (w := _warmup_s(path)) is not None}
        asked = {"pretrain": cfg.pretrain_steps, "sft": cfg.sft_steps, "opd": cfg.opd_steps,
                 "offpolicy": summary["steps"].get("opd") or cfg.opd_steps,
                 "grpo-mixed": mixed_steps(cfg, [summary["steps"].get(f"grpo-{d}", 0) for d in envs]),
                 **{f"grpo-{d}": cfg.grpo_steps for d in envs}}
        summary["too_few_steps"] = too_few_steps(summary["steps"], asked)
        summary["targets"] = targets(summary)
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write(summary_table(summary) + "\n")
        return summary

    base = stages.run("base", base_stage)
    if cfg.pretrain_steps:
        base = stages.run("pretrain", pretrain_stage)
    limits = turn_limits(envs, Tokenizer.from_dir(base), cfg.max_new_tokens, cfg.thinking)   # ~1 s (agent)
    done("base", base)
    sft_dir = done("sft", stages.run("sft", sft_stage))
    for domain in envs:
        specialists[domain] = done(f"grpo-{domain}", stages.run(f"grpo-{domain}", grpo_stage(
            [domain], cfg.grpo_steps, stage_cap(cfg, "grpo"))))
    opd = done("opd", stages.run("opd", distill_stage(False, cfg.opd_steps)))
    if cfg.off_policy_baseline:   # the OPD student's steps (fewer than opd_steps where its time cap stopped it)
        done("offpolicy", stages.run("offpolicy", distill_stage(True, _steps_done(opd) or cfg.opd_steps)))
    if cfg.mixed_grpo:
        steps = mixed_steps(cfg, [_steps_done(p) for p in specialists.values()])
        done("grpo-mixed", stages.run("grpo-mixed", grpo_stage(list(envs), steps, stage_cap(cfg, "grpo-mixed"))))
    summary = write_summary()
    _plot(out, list(envs), table, checkpoints)
    return summary


def mixed_steps(cfg: PipelineConfig, specialist_steps: Sequence[int] = ()) -> int:
    """The mixed-domain GRPO baseline's steps: as asked, or the steps the specialists took, summed (equal student
    compute: as many rollouts and updates as all specialists together; grpo_steps each where unknown)."""
    return cfg.mixed_grpo_steps or sum(specialist_steps) or cfg.grpo_steps * len(cfg.envs)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _steps_done(final_dir: str) -> int:
    """Training steps a stage took (its metrics.jsonl's last step row; a stage capped in time stops early)."""
    rows = read_metrics(os.path.join(os.path.dirname(final_dir), "metrics.jsonl"))
    return max((int(r["step"]) for r in rows if "step" in r and any(k in r for k in ("loss", "reward", "lm"))),
               default=0)


MIN_STEPS = 20   # fewer training steps than this in a stage: its accuracies say little (the summary warns)


def _warmup_s(final_dir: str) -> float | None:
    """Seconds of a stage's first step (compilation, allocation), outside its time cap; None where not logged."""
    rows = read_metrics(os.path.join(os.path.dirname(final_dir), "metrics.jsonl"))
    return next((float(r["warmup_s"]) for r in rows if "warmup_s" in r), None)


def too_few_steps(steps: Mapping[str, int], asked: Mapping[str, int], minimum: int = MIN_STEPS) -> dict[str, int]:
    """The stages their time cap stopped before `minimum` steps (name -> steps): fewer than both `minimum` and
    the steps asked of them (a stage asked for fewer steps is not flagged for taking them)."""
    return {name: n for name, n in steps.items() if n < min(minimum, asked.get(name, minimum))}


def targets(summary: dict) -> dict:
    """The issue's checks on the run: per domain the specialist's gain over SFT (points) and the OPD student's
    fraction of its specialist; the math specialist's rollout reward at the start and the end; the OPD stage's
    time over the specialists' GRPO time."""
    acc, sec = summary["accuracy"], summary["seconds"]
    domains = list(next(iter(acc.values())))
    out: dict = {"specialist_minus_sft": {}, "opd_over_specialist": {}}
    for d in domains:
        spec, sft_acc, opd = acc.get(f"grpo-{d}", {}).get(d), acc.get("sft", {}).get(d), acc.get("opd", {}).get(d)
        if spec is not None and sft_acc is not None:
            out["specialist_minus_sft"][d] = 100 * (spec - sft_acc)
        if spec and opd is not None:
            out["opd_over_specialist"][d] = opd / spec
    grpo_time = sum(v for k, v in sec.items() if k.startswith("grpo-") and k != "grpo-mixed")
    if grpo_time and "opd" in sec:
        out["opd_over_specialists_grpo_time"] = sec["opd"] / grpo_time
    if "math" in summary.get("grpo_reward", {}):
        out["math_grpo_reward"] = summary["grpo_reward"]["math"]
    return out


def grpo_reward_change(rows: Sequence[dict]) -> dict[str, float]:
    """A GRPO run's mean rollout reward and rollout accuracy (fraction fully correct) over its first and its last
    steps (a window of a fifth of the steps, 1 to 5), so one noisy batch does not decide whether they rose; {}
    for a run without step rows. Both, since a reward with partial credit (instruct: the fraction of constraints
    met) can rise while fewer rollouts are fully right."""
    steps = [r for r in rows if "reward" in r]
    if not steps:
        return {}
    k = max(1, min(5, len(steps) // 5))
    out = {"start": sum(r["reward"] for r in steps[:k]) / k, "end": sum(r["reward"] for r in steps[-k:]) / k,
           "window": k, "steps": len(steps)}
    if all("accuracy" in r for r in steps):
        out["accuracy_start"] = sum(r["accuracy"] for r in steps[:k]) / k
        out["accuracy_end"] = sum(r["accuracy"] for r in steps[-k:]) / k
    return out


def summary_table(summary: dict) -> str:
    """Markdown: one row per stage, held-out accuracy per domain and the stage's wall time; then per domain the
    claim of the pipeline: SFT -> specialist -> OPD student held-out accuracy, the student's fraction of its
    teacher's, and the specialist's GRPO rollout reward at the start and the end of training."""
    table, seconds = summary["accuracy"], summary["seconds"]
    gpu = summary.get("gpu_seconds") or {}
    domains = list(next(iter(table.values())))
    sizes = summary.get("heldout_n", {})
    levels = summary.get("levels") or {}
    heads = [f"{d} ({levels[d]})" if d in levels else d for d in domains]
    lines = ["| stage | " + " | ".join(heads) + " | time (s) |" + (" GPU s |" if gpu else ""),
             "|---|" + "---:|" * len(domains) + "---:|" + ("---:|" if gpu else "")]
    for stage, acc in table.items():
        t, g = seconds.get(stage), gpu.get(stage)
        lines.append(f"| {stage} | " + " | ".join(_cell(acc[d], sizes.get(d)) for d in domains) +
                     f" | {'' if t is None else f'{t:.0f}'} |" + (f" {'' if g is None else f'{g:.0f}'} |" if gpu
                                                                   else ""))
    few = summary.get("too_few_steps") or {}
    if few:
        lines.insert(0, f"**too few steps: raise --minutes**: "
                        + ", ".join(f"{k} {v}" for k, v in few.items())
                        + f" training steps, under {MIN_STEPS}; their accuracies say little\n")
    warm = summary.get("warmup_s") or {}
    if warm:
        lines.append("\nwarm-up (first step: compilation, allocation; outside the time caps, inside each stage's "
                     "time) (s): " + ", ".join(f"{k} {v:.1f}" for k, v in warm.items()))
    others = {k: v for k, v in seconds.items() if k not in table}
    if others:
        lines.append("\nother steps' time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in others.items()) +
                     (f"; device {summary['device']}" if summary.get("device") else ""))
    if sizes:
        lines.append("\nheld-out: greedy, " + ", ".join(f"{sizes[d]} {d}" for d in domains if d in sizes) +
                     " problems; ± is the binomial standard error sqrt(p (1 - p) / n), so differences within about "
                     "twice it are noise")
    limits = summary.get("turn_limits") or {}
    if limits:
        lines.append("\ntokens an assistant turn may take (rollouts and evaluations): "
                     + ", ".join(f"{d} {n}" for d, n in limits.items()))
    rewards = summary.get("grpo_reward", {})
    if not any(f"grpo-{d}" in table for d in domains):
        return "\n".join(lines)
    pool = summary.get("config", {}).get("grpo_pool")
    lv_head, lv_rule = (" level |", "---|") if levels else ("", "")
    lines += ["", f"| domain |{lv_head} SFT | specialist | OPD student | OPD / specialist | GRPO reward start -> end "
                  "| GRPO accuracy start -> end |",
              f"|---|{lv_rule}---:|---:|---:|---:|---|---|"]
    for d in domains:
        spec = table.get(f"grpo-{d}", {}).get(d)
        sft_acc, opd = table.get("sft", {}).get(d), table.get("opd", {}).get(d)
        ratio = "" if spec is None or opd is None or spec == 0 else f"{opd / spec:.2f}"
        r = rewards.get(d) or {}
        change = f"{r['start']:.3f} -> {r['end']:.3f}" if r else ""
        acc = f"{r['accuracy_start']:.3f} -> {r['accuracy_end']:.3f}" if "accuracy_start" in r else ""
        n = sizes.get(d)
        level = f" {levels.get(d, '')} |" if levels else ""
        lines.append(f"| {d} |{level} {_cell(sft_acc, n)} | {_cell(spec, n)} | {_cell(opd, n)} | {ratio} | {change} "
                     f"| {acc} |")
    if rewards:
        k = max((r.get("window", 0) for r in rewards.values() if r), default=0)
        where = f"a fixed pool of {pool} training problems" if pool else "fresh training problems"
        lines.append(f"\nGRPO reward and accuracy: mean rollout reward (partial credit included) and fraction of "
                     f"rollouts fully correct, over the first and the last {k} steps, on {where}")
    t = summary.get("targets") or {}
    if "opd_over_specialists_grpo_time" in t:
        lines.append(f"\nOPD time / specialists' GRPO time: {t['opd_over_specialists_grpo_time']:.2f}")
    return "\n".join(lines)


def _cell(x: float | None, n: int | None = None) -> str:
    """An accuracy, with its binomial standard error sqrt(p (1 - p) / n) when the number of problems n is known."""
    if x is None:
        return ""
    return f"{x:.3f}" if not n else f"{x:.3f} ± {(x * (1 - x) / n) ** 0.5:.3f}"


def _plot(out: str, domains: list[str], table: Mapping[str, Mapping[str, float]],
          checkpoints: Mapping[str, str]) -> None:
    """OUT/accuracy.png: held-out accuracy per stage and domain; OUT/curves.png: the specialists' rollout reward
    and the OPD student's and baseline's held-out accuracy during training."""
    from .curves import plt
    fig, ax = plt.subplots(figsize=(1.6 * len(table) + 3, 4))
    width = 0.8 / len(domains)
    for j, d in enumerate(domains):
        ax.bar([i + j * width for i in range(len(table))], [acc[d] for acc in table.values()], width, label=d)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(table))], list(table), rotation=20)
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy.png"), dpi=110)
    plt.close(fig)
    rows = {name: read_metrics(os.path.join(os.path.dirname(path), "metrics.jsonl"))
            for name, path in checkpoints.items()}
    plot_metrics({n: r for n, r in rows.items() if n.startswith("grpo-")},
                 [("GRPO rollout reward", "reward"), ("GRPO rollout accuracy", "accuracy")],
                 os.path.join(out, "reward.png"))
    plot_metrics({n: r for n, r in rows.items() if n in ("opd", "offpolicy")},
                 [("training reverse KL (OPD)", "kl/"), ("held-out accuracy (greedy)", "heldout_acc/"),
                  ("held-out reward (greedy)", "heldout_reward/")],
                 os.path.join(out, "distill.png"))
