"""Multi-teacher on-policy distillation: the student samples, each prompt's domain teacher scores every token.

    dsv4 distill --student runs/sft/final --teachers math=runs/grpo-math/final,code=runs/grpo-code/final \\
        --env math,code --out runs/opd
    dsv4 distill ... --off-policy --out runs/offpolicy     # baseline: SFT on the teachers' own samples

The loss is the exact full-vocabulary reverse KL(student || teacher) at every sampled token (chunked over
tokens), plus the MTP head's cross-entropy on the student's own tokens (--mtp-weight, on detached lanes). The
teachers load in inference mode on the student's device (bf16 on a GPU, fp32 on the CPU). Writes
OUT/metrics.jsonl, OUT/distill.png (KL and held-out accuracy per domain), OUT/summary.json and OUT/final/ (the
student with its tokenizer).
"""
from __future__ import annotations

import argparse
import json
import os

from ..errors import InvalidArgument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", required=True, metavar="DIR", help="checkpoint directory (with tokenizer.json)")
    p.add_argument("--teachers", required=True, metavar="DOMAIN=DIR,...",
                   help="each domain's teacher checkpoint, e.g. math=runs/math/final,code=runs/code/final")
    p.add_argument("--env", required=True, metavar="NAME,...", help="the domains' environments, e.g. math,code")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--batch-prompts", type=int, default=8, help="problems per step, spread evenly over the domains")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="of the sampler (student; teachers off-policy)")
    p.add_argument("--mtp-weight", type=float, default=0.3, help="weight of the MTP head's loss (0: off)")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-prompts", type=int, default=16, help="held-out problems per domain (greedy)")
    p.add_argument("--optimizer", default="muon", choices=["muon", "adamw"])
    p.add_argument("--chunk", type=int, default=1024, help="tokens per head/softmax chunk of the reverse KL")
    p.add_argument("--thinking", action="store_true", help="prompts and completions in thinking mode")
    p.add_argument("--off-policy", action="store_true",
                   help="the baseline: teachers write the completions, the student trains with CE on them")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (the GPU if there is one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_teachers(text: str) -> dict[str, str]:
    """'math=DIR,code=DIR' -> {"math": DIR, "code": DIR}."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        domain, sep, path = item.partition("=")
        if not sep or not domain or not path:
            raise InvalidArgument(f"--teachers: {item!r} is not DOMAIN=DIR")
        if domain in out:
            raise InvalidArgument(f"--teachers: domain {domain!r} is given twice")
        out[domain] = path
    if not out:
        raise InvalidArgument("--teachers: no DOMAIN=DIR given")
    return out


def parse_envs(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or len(set(names)) != len(names):
        raise InvalidArgument(f"--env {text!r}: give distinct environment names, comma-separated")
    return names


def run(args: argparse.Namespace) -> int:
    teachers_at, names = parse_teachers(args.teachers), parse_envs(args.env)
    missing = [n for n in names if n not in teachers_at]
    if missing:
        raise InvalidArgument(f"--env names {missing} with no teacher in --teachers ({sorted(teachers_at)})")
    from ..posttrain.distill import DistillConfig
    cfg = DistillConfig(steps=args.steps, lr=args.lr, warmup=args.warmup, batch_prompts=args.batch_prompts,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        mtp_weight=args.mtp_weight, off_policy=args.off_policy, eval_every=args.eval_every,
                        eval_prompts=args.eval_prompts, optimizer=args.optimizer, chunk=args.chunk,
                        thinking=args.thinking, seed=args.seed)
    from ..posttrain.distill_run import run_distill
    summary = run_distill(args.student, {n: teachers_at[n] for n in names}, names, args.out, cfg,
                          device=args.device, progress=not args.no_progress)
    print(json.dumps(summary["final"], indent=1))
    print(f"metrics {os.path.join(args.out, 'metrics.jsonl')}; curves {summary['plot']}; "
          f"student {summary['final_dir']}")
    return 0
