"""Per-domain turn limits: derived from the demonstrations' longest assistant turn, and the command line's
N | DOMAIN=N,... form."""
from __future__ import annotations

import random

import pytest

from dsv4.errors import InvalidArgument
from dsv4.posttrain.chat_data import encode_conversation, encode_prompt
from dsv4.posttrain.envs.base import Problem
from dsv4.posttrain.turn_limits import (derived_limit, largest_limit, limit_for, longest_turn,
                                        parse_max_new_tokens, turn_limits)
from cli_capture import posttrain_config
from grpo_toys import toy_tokenizer


class _Words:
    """Replies of 1 to `most` repeated words: the longest turn grows with `most`."""
    max_turns = 1

    def __init__(self, name: str, most: int):
        self.name, self.most = name, most

    def sample(self, rng: random.Random) -> Problem:
        k = rng.randint(1, self.most)
        return Problem(self.name, str(k), [{"role": "user", "content": f"say {k}"}], "hello world " * k)

    def demonstrate(self, problem: Problem) -> list[dict]:
        return [{"role": "assistant", "content": problem.answer.strip()}]


def test_longest_turn_is_the_tokens_a_rollout_samples_for_the_longest_demonstration():
    """Oracle: conversation tokens minus the prompt's (with its assistant opener), what the policy must sample."""
    tok = toy_tokenizer()
    env = _Words("w", 6)
    rng = random.Random(0)
    want = 0
    for k in range(1, 7):
        p = Problem("w", str(k), [{"role": "user", "content": f"say {k}"}], "hello world " * k)
        full = encode_conversation(tok, [*p.messages, *env.demonstrate(p)]).tokens
        want = max(want, len(full) - len(encode_prompt(tok, p.messages)))
    assert longest_turn(env, tok, n=200) == want
    assert longest_turn(_Words("w", 2), tok, n=200) < want
    assert derived_limit(want) >= want + 4


def test_overrides_one_for_all_or_some_domains():
    tok = toy_tokenizer()
    envs = {"short": _Words("short", 1), "long": _Words("long", 8)}
    derived = turn_limits(envs, tok)
    assert derived["short"] < derived["long"]
    assert turn_limits(envs, tok, 40) == {"short": 40, "long": 40}
    assert turn_limits(envs, tok, {"long": 7}) == {"short": derived["short"], "long": 7}
    with pytest.raises(InvalidArgument):
        turn_limits(envs, tok, {"agent": 7})
    assert limit_for(derived, "long") == derived["long"] and limit_for(9, "any") == 9
    with pytest.raises(InvalidArgument):
        limit_for({"short": 3}, "long")
    assert largest_limit({"a": 3, "b": 11}) == 11 and largest_limit(5) == 5


@pytest.mark.parametrize("text, want", [("40", 40), ("math=20, agent=90", {"math": 20, "agent": 90}),
                                        ("code=5,", {"code": 5})])
def test_parse_max_new_tokens(text, want):
    assert parse_max_new_tokens(text) == want


@pytest.mark.parametrize("text", ["0", "-3", "x", "math=", "=4", "math=0", "math=2,agent"])
def test_parse_max_new_tokens_refuses_bad_forms(text):
    with pytest.raises(InvalidArgument):
        parse_max_new_tokens(text)


@pytest.mark.parametrize("flag, want", [(None, None), ("40", 40), ("agent=90,math=12", {"agent": 90, "math": 12})])
def test_posttrain_cli_passes_the_limits_on(monkeypatch, flag, want):
    cfg = posttrain_config(monkeypatch, ["--env", "math,agent"] + ([] if flag is None else ["--max-new-tokens", flag]))
    assert cfg.max_new_tokens == want
