"""The whole post-training pipeline, small scale: base (optionally pre-trained), SFT, GRPO specialists, the OPD
student, the off-policy and mixed-domain GRPO baselines.

    dsv4 posttrain --out runs/posttrain                  # tiny, on the CPU: about 8 minutes on one thread
    dsv4 posttrain --out runs/pt --env math,instruct --grpo-steps 40 --opd-steps 40
    dsv4 posttrain --out runs/pt --env math,code:medium,instruct:hard   # a level per domain (math: --level)
    dsv4 posttrain --out runs/pt --only opd,offpolicy    # rerun the distillation stages on the earlier ones
    dsv4 posttrain --out runs/gpu --device cuda --model mini --env math,code,instruct,agent --pretrain-steps 300 \
        --mixed-grpo --stage-minutes 2                   # one GPU: bench/posttrain_gpu.sh

Each stage writes OUT/<stage>/ (metrics.jsonl, its plot, final/); OUT/summary.md is the held-out accuracy of
every stage per domain (± its binomial standard error) with each stage's time, then per domain SFT -> specialist -> OPD student and the GRPO
rollout reward at the start and the end; OUT/accuracy.png, reward.png and distill.png draw them.
"""
from __future__ import annotations

import argparse

from ..errors import InvalidArgument

_STAGES = ("base", "pretrain", "sft", "grpo", "opd", "offpolicy", "grpo-mixed")


# PipelineConfig fields with a flag of their own, --sft-steps etc.; unset ones keep the config's default
_NUMBERS = ("sft_examples", "sft_steps", "sft_lr", "sft_batch_size", "grpo_steps", "grpo_lr", "grpo_generations",
            "grpo_batch_prompts", "grpo_pool", "opd_steps", "opd_lr", "opd_batch_prompts", "eval_problems",
            "vocab_size", "seed", "tokenizer_examples", "pretrain_steps", "pretrain_examples",
            "pretrain_lr", "pretrain_batch_size", "pretrain_seq_len", "mixed_grpo_steps", "stage_minutes",
            "grpo_eval_problems", "grpo_minibatches")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--env", default="math,instruct", metavar="NAME[:LEVEL],...",
                   help="the domains, each optionally at its own level: math,code:medium,instruct:hard "
                        "(default: math,instruct; a name without :LEVEL takes --level)")
    p.add_argument("--level", default="easy",
                   help="the difficulty (easy, medium, hard) of every domain --env gives no level")
    p.add_argument("--base", metavar="DIR",
                   help="start from this checkpoint (with tokenizer) instead of a new one")
    p.add_argument("--model", default="tiny",
                   help="a new base's size: a preset (tiny, small) or one of the pipeline's (micro, mini)")
    p.add_argument("--mixed-grpo", action="store_true",
                   help="also the mixed-domain GRPO baseline (stage grpo-mixed; steps: --mixed-grpo-steps, "
                        "default the specialists' summed)")
    p.add_argument("--thinking", action="store_true", help="thinking mode throughout")
    p.add_argument("--no-off-policy", action="store_true", help="skip the off-policy distillation baseline")
    p.add_argument("--only", metavar="STAGE,...", help=f"run only these stages of {', '.join(_STAGES)} "
                                                         "(grpo: every specialist); the others are read from OUT")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"],
                   help="every stage's (default adamw: Muon's Newton-Schulz dominates a tiny model's CPU step)")
    p.add_argument("--sampler", default="direct", choices=["direct", "engine"],
                   help="GRPO's rollout sampler (default direct: batched on the model, several times the serving "
                        "engine's speed for the tiny model on a CPU)")
    p.add_argument("--minutes", metavar="STAGE=MIN,...",
                   help="time caps of some stages, e.g. pretrain=1.2,sft=0.8,grpo=0.5 (grpo: each specialist; "
                        "also opd, offpolicy, grpo-mixed; the others --stage-minutes)")
    p.add_argument("--sft-pack", action="store_true",
                   help="SFT packs conversations into rows instead of padding each to the longest")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="on a GPU, torch.compile the training ops without a Triton training kernel (default off: "
                        "for the pipeline's small models and minute-long stages, compiling each new shape costs "
                        "more than it saves; the Triton kernels run either way)")
    p.add_argument("--max-new-tokens", metavar="N|DOMAIN=N,...",
                   help="tokens an assistant turn may take in rollouts and evaluations: N for every domain, or "
                        "DOMAIN=N,... for some (default: each domain's longest demonstrated turn x 1.25 + 4)")
    p.add_argument("--no-progress", action="store_true")
    for name in _NUMBERS:
        p.add_argument("--" + name.replace("_", "-"), type=float if name.endswith(("lr", "minutes")) else int,
                       default=None)


def run(args: argparse.Namespace) -> int:
    from ..posttrain.pipeline import PipelineConfig, run_pipeline, summary_table
    from ..posttrain.envs.registry import parse_env_levels
    levels = parse_env_levels(args.env, args.level)
    envs = tuple(levels)
    only: tuple[str, ...] = ()
    if args.only:
        asked = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in asked if s not in _STAGES]
        if bad:
            raise InvalidArgument(f"--only: unknown stage(s) {bad}; choose from {', '.join(_STAGES)}")
        only = tuple(s for a in asked for s in ([f"grpo-{d}" for d in envs] if a == "grpo" else [a]))
    numbers = {n: getattr(args, n) for n in _NUMBERS if getattr(args, n) is not None}
    if args.max_new_tokens is not None:
        from ..posttrain.turn_limits import parse_max_new_tokens
        numbers["max_new_tokens"] = parse_max_new_tokens(args.max_new_tokens)
    if args.minutes:
        try:
            numbers["minutes"] = {k.strip(): float(v) for k, v in (s.split("=") for s in args.minutes.split(","))}
        except ValueError:
            raise InvalidArgument(f"--minutes {args.minutes!r}: expected STAGE=MINUTES,...") from None
    cfg = PipelineConfig(envs=envs, level=args.level, levels=levels, base=args.base, model=args.model,
                         mixed_grpo=args.mixed_grpo, sft_pack=args.sft_pack, thinking=args.thinking,
                         off_policy_baseline=not args.no_off_policy, only=only, device=args.device,
                         optimizer=args.optimizer, sampler=args.sampler, progress=not args.no_progress,
                         compile=args.compile, **numbers)
    summary = run_pipeline(args.out, cfg)
    print("\n" + summary_table(summary))
    print(f"\ntotal {summary['total_seconds']:.0f} s; summary {args.out}/summary.md; plots {args.out}/accuracy.png, "
          f"reward.png, distill.png")
    return 0
