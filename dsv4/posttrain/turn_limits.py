"""How many tokens a sampled assistant turn may take, per domain, derived from the domain's demonstrations.

Why per domain: one limit for every domain either cuts the long turns (an agent's tool call is several times a
math answer) or lets short-answer domains ramble for many useless tokens in every rollout. The limit of a domain
is its solver's longest assistant turn (in the policy's tokens, EOS included: exactly what the policy must
sample for that turn) over `DEMOS` demonstrations of fixed problems, times `SLACK`, plus `EXTRA` tokens: room
for a phrasing a little longer than the solver's without paying for much more than the task needs.

`parse_max_new_tokens` reads the command line's `--max-new-tokens`: N (every domain) or DOMAIN=N,... (those
domains; the others keep their derived limit).
"""
from __future__ import annotations

import math
import random
from typing import Mapping, Sequence

from ..errors import InvalidArgument
from .chat_data import encode_conversation
from .envs.base import Environment

__all__ = ["DEMOS", "SLACK", "EXTRA", "longest_turn", "derived_limit", "turn_limits", "parse_max_new_tokens",
           "check_max_new_tokens", "limit_for", "largest_limit"]

DEMOS = 300          # demonstrations per domain the longest turn is taken over
SLACK = 1.25         # x the longest turn ...
EXTRA = 4            # ... + this many tokens



def longest_turn(env: Environment, tokenizer, n: int = DEMOS, seed: int = 0, thinking: bool = False) -> int:
    """Tokens of the longest assistant turn (through its EOS) in `n` demonstrations of `env`'s problems drawn
    from `seed`: the policy's share of each conversation's SFT mask, split into its contiguous turns."""
    rng = random.Random(f"dsv4-turn-limits:{env.name}:{seed}")
    longest = 0
    for _ in range(n):
        problem = env.sample(rng)
        example = encode_conversation(tokenizer, [*problem.messages, *env.demonstrate(problem)], thinking)
        run = 0
        for m in example.mask:
            run = run + 1 if m else 0
            longest = max(longest, run)
    return longest


def derived_limit(longest: int) -> int:
    """The limit that leaves room over a longest demonstrated turn of `longest` tokens."""
    return math.ceil(SLACK * longest) + EXTRA


def turn_limits(envs: Mapping[str, Environment], tokenizer, override: int | Mapping[str, int] | None = None,
                thinking: bool = False) -> dict[str, int]:
    """Per domain of `envs`: `override` when it is an int, else override[domain] where given, else the limit
    derived from the domain's demonstrations."""
    if isinstance(override, int) and not isinstance(override, bool):
        return {d: override for d in envs}
    given = dict(override or {})
    unknown = sorted(set(given) - set(envs))
    if unknown:
        raise InvalidArgument(f"max_new_tokens for {unknown}: not among the domains {sorted(envs)}")
    return {d: given[d] if d in given else derived_limit(longest_turn(env, tokenizer, thinking=thinking))
            for d, env in envs.items()}


def parse_max_new_tokens(text: str) -> int | dict[str, int]:
    """`--max-new-tokens`: "N" (every domain) or "DOMAIN=N,..." (those domains)."""
    def positive(value: str, what: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise InvalidArgument(f"--max-new-tokens {text!r}: {what} must be a positive integer, got {value!r}")
        return n
    text = text.strip()
    if "=" not in text:
        return positive(text, "the limit")
    out: dict[str, int] = {}
    for part in filter(None, (s.strip() for s in text.split(","))):
        domain, eq, value = part.partition("=")
        if not eq or not domain.strip():
            raise InvalidArgument(f"--max-new-tokens {text!r}: expected N or DOMAIN=N,...")
        out[domain.strip()] = positive(value.strip(), domain.strip())
    return out


def check_max_new_tokens(value, what: str, allow_none: bool = False) -> None:
    """Refuse a limit that is not a positive int or a mapping domain -> positive int (None where allowed:
    derive them all)."""
    if value is None and allow_none:
        return
    values = list(value.values()) if isinstance(value, Mapping) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise InvalidArgument(f"{what} max_new_tokens={value!r}: must be a positive integer or a mapping "
                              "domain -> positive integer")


def limit_for(max_new_tokens: int | Mapping[str, int], domain: str) -> int:
    """The limit of one domain's turns; a mapping without the domain is an error (no silent default)."""
    if isinstance(max_new_tokens, Mapping):
        if domain not in max_new_tokens:
            raise InvalidArgument(f"max_new_tokens has no limit for domain {domain!r}: {dict(max_new_tokens)}")
        return int(max_new_tokens[domain])
    return int(max_new_tokens)


def largest_limit(max_new_tokens: int | Mapping[str, int], domains: Sequence[str] | None = None) -> int:
    """The largest limit (of `domains`, or of all given): what a buffer sized for any turn needs."""
    if isinstance(max_new_tokens, Mapping):
        values = [max_new_tokens[d] for d in domains] if domains is not None else list(max_new_tokens.values())
        return max(values) if values else 1
    return int(max_new_tokens)
