"""Pre-training a fresh base on task-rich plain text, before SFT: the pipeline's `pretrain` stage.

The text is the environments' problems and their solvers' answers written out as plain documents ("user: ...",
"assistant: ...", tool calls as `name(arguments)`), without the chat template, so the base learns the domains'
language and facts (arithmetic, Python, the agent's tool results) but not the V4 chat format that SFT teaches.
Every token is a target (next-token prediction), documents packed into rows of `seq_len`; the loop is SFT's
(`train_sft`: the same optimizer, schedule, MTP loss and metrics.jsonl).
"""
from __future__ import annotations

import json
import random
from typing import Mapping

from ..generate.tokenizer import Tokenizer
from .chat_data import Example
from .envs.base import Environment
from .sft import SFTConfig, train_sft

__all__ = ["plain_text", "pretrain_examples", "pretrain"]


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
    """Pre-train `model` in place on pretrain_examples (packed; cfg.pack is forced on) and save OUT/final/."""
    examples = pretrain_examples(envs, n, tokenizer, random.Random(seed))
    cfg.pack = True
    return train_sft(model, tokenizer, examples, cfg, out, tokenizer_dir=tokenizer_dir)
