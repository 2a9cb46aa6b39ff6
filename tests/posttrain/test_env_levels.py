"""A difficulty level per domain: the `--env NAME[:LEVEL],...` form, and the level reaching each domain's
environment, held-out set and turn limit in the pipeline."""
from __future__ import annotations

import pytest

from dsv4.errors import InvalidArgument
from dsv4.posttrain.envs.registry import parse_env_levels
from dsv4.posttrain.pipeline import PipelineConfig, build_envs, summary_table

from cli_capture import posttrain_config


def _level(env) -> str:
    """An environment's level name (math keeps a MathLevel, the others the name)."""
    return getattr(env.level, "name", env.level)


@pytest.mark.parametrize("spec, default, want", [
    ("math,code:medium,instruct:hard,agent:medium", "easy",
     {"math": "easy", "code": "medium", "instruct": "hard", "agent": "medium"}),
    ("math,instruct", "hard", {"math": "hard", "instruct": "hard"}),
    (" agent : medium , math ", "easy", {"agent": "medium", "math": "easy"}),   # order kept, spaces ignored
    ("math:easy", "hard", {"math": "easy"}),                                      # its own level wins
])
def test_parse_env_levels(spec, default, want):
    got = parse_env_levels(spec, default)
    assert got == want and list(got) == list(want)


@pytest.mark.parametrize("spec, default, names", [
    ("", "easy", "no environment"),
    ("math,,code", "easy", "empty entry ''"),
    ("math,maths:hard", "easy", "unknown environment 'maths' in 'maths:hard'"),
    ("math,code:extreme", "easy", "unknown level 'extreme' in 'code:extreme'"),
    ("math:", "easy", "unknown level '' in 'math:'"),
    ("math,code,math:hard", "easy", "'math' given twice ('math:hard')"),
    ("math", "extreme", "--level 'extreme'"),
])
def test_parse_env_levels_names_the_bad_part(spec, default, names):
    with pytest.raises(InvalidArgument) as e:
        parse_env_levels(spec, default)
    assert names in str(e.value)


def test_cli_gives_each_domain_its_level_and_the_rest_level(monkeypatch):
    cfg = posttrain_config(monkeypatch, ["--env", "math,code:medium,agent", "--level", "hard"])
    assert cfg.envs == ("math", "code", "agent")
    assert cfg.env_levels() == {"math": "hard", "code": "medium", "agent": "hard"}
    plain = posttrain_config(monkeypatch, ["--env", "math,instruct", "--level", "medium"])   # --level as before
    assert plain.env_levels() == {"math": "medium", "instruct": "medium"}
    with pytest.raises(InvalidArgument, match="unknown level 'hardest'"):
        posttrain_config(monkeypatch, ["--env", "math:hardest"])


def test_cli_only_grpo_names_the_domains_without_their_levels(monkeypatch):
    cfg = posttrain_config(monkeypatch, ["--env", "math,agent:medium", "--only", "grpo"])
    assert cfg.only == ("grpo-math", "grpo-agent")


@pytest.mark.parametrize("kw, names", [
    (dict(envs=("math", "math")), "math given more than once"),
    (dict(envs=("math",), levels={"code": "hard"}), "code not among envs"),
    (dict(envs=("math",), levels={"math": "extreme"}), "'extreme' for math"),
    (dict(envs=("math",), level="extreme"), "'extreme' for (every domain)"),
])
def test_config_check_refuses_bad_levels(kw, names):
    with pytest.raises(InvalidArgument) as e:
        PipelineConfig(**kw).check()
    assert names in str(e.value)


def test_mixed_levels_build_each_environment_at_its_level():
    cfg = PipelineConfig(envs=("math", "instruct", "agent"), level="easy", levels={"instruct": "hard",
                                                                                   "agent": "medium"})
    envs = build_envs(cfg)
    assert list(envs) == ["math", "instruct", "agent"]
    assert {d: _level(e) for d, e in envs.items()} == {"math": "easy", "instruct": "hard", "agent": "medium"}
    # the held-out sets follow the level: easy instruct has 74 problems in all, hard more than 100
    assert all(p.meta["level"] == "hard" for p in envs["instruct"].heldout(100))
    assert envs["agent"].max_turns > build_envs(PipelineConfig(envs=("agent",)))["agent"].max_turns


def test_turn_limits_follow_each_domains_level():
    """A mixed config's limit of a domain is the one that domain's level gives alone: instruct's hard replies
    (JSON, several constraints) are longer than its easy one-word ones, so the limits differ."""
    from dsv4.posttrain.turn_limits import turn_limits
    from grpo_toys import toy_tokenizer
    tok = toy_tokenizer()

    def limits(**kw) -> dict[str, int]:
        return turn_limits(build_envs(PipelineConfig(**kw)), tok)
    easy = limits(envs=("math", "instruct"), level="easy")
    hard = limits(envs=("instruct",), level="hard")
    mixed = limits(envs=("math", "instruct"), level="easy", levels={"instruct": "hard"})
    assert hard["instruct"] > 2 * easy["instruct"]
    assert mixed == {"math": easy["math"], "instruct": hard["instruct"]}


def test_summary_shows_each_domains_level():
    text = summary_table({"accuracy": {"sft": {"math": 0.25}, "grpo-math": {"math": 0.5}, "opd": {"math": 0.4}},
                          "seconds": {}, "levels": {"math": "medium"}})
    lines = text.splitlines()
    assert lines[0] == "| stage | math (medium) | time (s) |"
    assert any(line.startswith("| math | medium | 0.250 |") for line in lines)
