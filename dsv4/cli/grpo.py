"""GRPO on verifiable environments: G sampled answers per prompt, group-normalised rewards, clipped ratio.

    dsv4 grpo --model runs/sft/final --env math --out runs/grpo-math
    dsv4 grpo --model runs/sft/final --env math,code --steps 200 --num-generations 8 --batch-prompts 16 \\
        --lr 1e-6 --beta 0.01 --loss-type dr_grpo --routing-replay --out runs/grpo-mix
    dsv4 grpo --model runs/pt/sft/final --env math --sampler direct --pool 64 --optimizer adamw --lr 1e-4 \
        --batch-prompts 32 --max-new-tokens 24 --out runs/grpo-tiny      # the pipeline's specialist, on a CPU

Writes OUT/metrics.jsonl (reward, accuracy, KL, entropy, response length, clip fraction, train-vs-rollout
drift, grad norm per step; greedy held-out accuracy at the start, every --eval-every steps and at the end),
OUT/reward.png, and OUT/final/ in the official checkpoint format with the tokenizer.
"""
from __future__ import annotations

import argparse
import importlib
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="policy checkpoint (config.json, safetensors, "
                                                                  "tokenizer.json)")
    p.add_argument("--env", required=True, help="comma-separated environments, e.g. math or math,code,agent")
    p.add_argument("--level", default="easy", help="environment difficulty (default: easy)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--num-generations", type=int, default=8, help="G: samples per prompt")
    p.add_argument("--batch-prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--optimizer", choices=["muon", "adamw"], default="muon")
    p.add_argument("--beta", type=float, default=0.0, help="KL-to-reference weight (0: no reference model)")
    p.add_argument("--epsilon", type=float, default=0.2, help="ratio clip")
    p.add_argument("--epsilon-high", type=float, default=None, help="upper ratio clip (default: --epsilon)")
    p.add_argument("--loss-type", choices=["grpo", "dr_grpo"], default="grpo")
    p.add_argument("--mu", type=int, default=1, help="optimisation epochs per rollout batch")
    p.add_argument("--minibatches", type=int, default=1, help="minibatches per epoch")
    p.add_argument("--routing-replay", action="store_true",
                   help="train on the experts and indexer top-k chosen at rollout time")
    p.add_argument("--max-new-tokens", type=int, default=64, help="per assistant turn")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus cut of the rollouts (1: off; below 1 the rollout log-probabilities are of the cut "
                        "distribution, which the trainer's do not reproduce: the drift grows)")
    p.add_argument("--thinking", action="store_true", help="thinking-mode prompts (<think> ... </think>)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out evaluation interval in steps (0: start/end)")
    p.add_argument("--eval-problems", type=int, default=32, help="held-out problems per environment")
    p.add_argument("--sampler", choices=["engine", "direct"], default="engine",
                   help="rollout sampler: the serving engine (default; needed by --routing-replay) or direct "
                        "(batched on the model, several times faster for a tiny model on a CPU)")
    p.add_argument("--pool", type=int, default=0, metavar="N",
                   help="train on a fixed pool of N problems per environment (0: fresh problems every step)")
    p.add_argument("--no-autocast", dest="autocast", action="store_false",
                   help="run the training forwards in fp32 on a GPU (default: under bf16 autocast, as the rollouts "
                        "compute; the loss is fp32 either way; no effect on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def make_envs(names: str, level: str) -> dict:
    """name -> environment, from the environment registry (dsv4.posttrain.envs.registry, imported by name so
    building the parser needs none of it)."""
    from ..errors import InvalidArgument
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        raise InvalidArgument(f"--env {names!r}: name at least one environment")
    if len(set(wanted)) != len(wanted):
        raise InvalidArgument(f"--env {names!r}: an environment is named twice")
    try:
        registry = importlib.import_module("dsv4.posttrain.envs.registry")
    except ModuleNotFoundError as e:
        raise InvalidArgument(f"--env: the environment registry is not available in this install ({e})") from None
    return {n: registry.make_env(n, level=level) for n in wanted}


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load_model, resolve_device
    from ..errors import InvalidArgument
    from ..generate.tokenizer import Tokenizer
    from ..posttrain.grpo import GRPOConfig, grpo_train

    if os.path.isfile(os.path.join(args.out, "metrics.jsonl")) and not args.overwrite:
        raise InvalidArgument(f"--out {args.out}: holds a previous run (metrics.jsonl); pass --overwrite to replace it")
    cfg = GRPOConfig(steps=args.steps, num_generations=args.num_generations, batch_prompts=args.batch_prompts,
                     lr=args.lr, optimizer=args.optimizer, beta=args.beta, epsilon=args.epsilon,
                     epsilon_high=args.epsilon_high, loss_type=args.loss_type, mu=args.mu,
                     minibatches=args.minibatches, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, thinking=args.thinking,
                     routing_replay=args.routing_replay, eval_every=args.eval_every,
                     eval_problems=args.eval_problems, seed=args.seed, sampler=args.sampler,
                     autocast=args.autocast)
    if args.pool < 0:
        raise InvalidArgument(f"--pool {args.pool}: must be >= 0 (0: fresh problems)")
    envs = make_envs(args.env, args.level)
    if args.pool:
        from ..posttrain.envs.pool import ProblemPool
        envs = {n: ProblemPool(e, args.pool, seed=args.seed) for n, e in envs.items()}
    tokenizer = Tokenizer.from_dir(args.model)
    if tokenizer.eos_id is None:
        raise InvalidArgument(f"--model {args.model}: the tokenizer names no EOS token; assistant turns end with it")
    torch.manual_seed(args.seed)
    model = load_model(args.model, device=resolve_device(args.device), dtype=torch.float32, weights="bf16").train()
    res = grpo_train(model, tokenizer, envs, cfg, out=args.out, tokenizer_dir=args.model)
    first, last = res.evals[0], res.evals[-1]
    print(f"held-out accuracy {first['eval_acc']:.3f} -> {last['eval_acc']:.3f}; "
          f"final policy in {os.path.join(args.out, 'final')}")
    return 0
