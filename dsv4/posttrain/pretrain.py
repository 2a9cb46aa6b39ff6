"""Pre-training a fresh base on task-rich plain text, before SFT: the pipeline's `pretrain` stage.

The text is the environments' problems and their solvers' answers written out as plain documents ("user: ...",
"assistant: ...", tool calls as `name(arguments)`), without the chat template, so the base learns the domains'
language and facts (arithmetic, Python, the agent's tool results) but not the V4 chat format that SFT teaches.
Every token is a target (next-token prediction). The documents are joined into one stream and cut into rows of
`seq_len` (stream.py: every step has the same shape, so on a GPU it replays as a CUDA graph; attention runs
across the documents of a row, each ending in EOS, as in `dsv4 train`). The loss is `dsv4 train`'s (without the
balance loss) and the loop SFT's (`train_steps`: the same optimizer, schedule, MTP loss and metrics.jsonl).
"""
from __future__ import annotations

import json
import random
from typing import Mapping

from ..generate.tokenizer import Tokenizer
from ..model import Transformer
from ..train.losses import LossWeights
from ..train.step import step_outputs
from .chat_data import Example
from .envs.base import Environment
from .sft import SFTConfig, _autocast, train_steps
from .step_loop import StepInput
from .stream import StreamRows

__all__ = ["plain_text", "pretrain_examples", "pretrain", "train_pretrain"]


def plain_text(messages: list[dict]) -> str:
    """A conversation as a plain document: one line per message, tool calls as name(arguments)."""
    lines = []
    for m in messages:
        parts = [m.get("content") or ""]
        for call in m.get("tool_calls") or []:
            fn = call.get("function", call)
            args = fn.get("arguments")
            parts.append(f"{fn.get('name')}({args if isinstance(args, str) else json.dumps(args)})")
        lines.append(f"{m['role']}: " + " ".join(p for p in parts if p))
    return "\n".join(lines) + "\n\n"


def pretrain_examples(envs: Mapping[str, Environment], n: int, tokenizer: Tokenizer, rng: random.Random
                      ) -> list[Example]:
    """n fresh problems per domain with their solvers' answers, as plain documents (every token trained),
    each ending in EOS."""
    out = []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    for name, env in envs.items():
        for _ in range(n):
            p = env.sample(rng)
            ids = tokenizer.encode(plain_text([*p.messages, *env.demonstrate(p)])) + eos
            out.append(Example(ids, [1] * len(ids), f"<{name} document>"))
    return out


def pretrain(model, tokenizer: Tokenizer, envs: Mapping[str, Environment], n: int, cfg: SFTConfig, out: str, *,
             tokenizer_dir: str, seed: int) -> dict:
    """Pre-train `model` in place on pretrain_examples and save OUT/final/."""
    examples = pretrain_examples(envs, n, tokenizer, random.Random(seed))
    return train_pretrain(model, tokenizer, examples, cfg, out, tokenizer_dir=tokenizer_dir)


def train_pretrain(model: Transformer, tokenizer: Tokenizer, examples: list[Example], cfg: SFTConfig, out: str, *,
                   tokenizer_dir: str | None = None) -> dict:
    """Next-token (and MTP) training on every token of the examples, as stream rows of cfg.seq_len; cfg.steps
    None: cfg.epochs passes. Writes and returns what train_sft does."""
    cfg.check()
    device = next(model.parameters()).device
    data = StreamRows(examples, cfg.batch_size, cfg.seq_len, 1 + len(model.mtp), seed=cfg.seed)
    steps = cfg.steps or cfg.epochs * data.batches_per_epoch
    graphs = cfg.graphs_on(device)
    weights = LossWeights(mtp=cfg.mtp_weight, indexer_kl=cfg.indexer_kl_weight, balance=0.0)
    autocast = _autocast(device, graphs)
    n = cfg.batch_size * cfg.seq_len
    feed = (StepInput(rows, None, n, n) for rows in data)
    return train_steps(model, tokenizer, feed, lambda x, _: step_outputs(model, x, weights, "sparse", 1, autocast),
                       steps, cfg, out, stage="pretrain", graphs=graphs, tokenizer_dir=tokenizer_dir)
