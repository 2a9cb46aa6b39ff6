"""The tiny post-training pipeline: its pieces cheaply, and the whole run end to end (slow)."""
from __future__ import annotations

import json
import os
import random

import pytest

from dsv4.errors import InvalidArgument
from dsv4.posttrain.pipeline import (PipelineConfig, _Stages, build_base, demonstrations, grpo_reward_change,
                                    heldout_size, run_pipeline, summary_table, too_few_steps)


class _Env:
    name, max_turns = "echo", 1

    def sample(self, rng):
        from dsv4.posttrain.envs.base import Problem
        c = rng.choice("abc")
        return Problem("echo", f"s{rng.random()}", [{"role": "user", "content": f"say {c}"}], c)

    def demonstrate(self, problem):
        return [{"role": "assistant", "content": problem.answer}]


def test_demonstrations_are_prompt_plus_solver_turns():
    convs = demonstrations(_Env(), 3, random.Random(0))
    assert len(convs) == 3
    for c in convs:
        user, assistant = c["messages"]
        assert user["role"] == "user" and assistant == {"role": "assistant", "content": user["content"][-1]}


def test_build_base_saves_a_loadable_policy_with_its_tokenizer(tmp_path):
    from dsv4.posttrain.policy import load_policy
    out = build_base(str(tmp_path / "base"), ["<｜User｜>say a<｜Assistant｜></think>a<｜end▁of▁sentence｜>"] * 20,
                     300, seed=0)
    model, tok = load_policy(out, "cpu")
    assert tok.vocab_size <= model.config.vocab_size <= 300 and tok.eos_id is not None


def test_stages_run_in_order_and_only_reuses_earlier_results(tmp_path):
    stages = _Stages(str(tmp_path), only=())
    assert stages.run("a", lambda d: os.path.join(d, "final")) == str(tmp_path / "a" / "final")
    assert set(stages.seconds) == {"a"}
    partial = _Stages(str(tmp_path), only=("b",))
    with pytest.raises(InvalidArgument, match="stage 'a' is not asked for"):
        partial.run("a", lambda d: d)                     # a/final was never written
    os.makedirs(tmp_path / "a" / "final")
    assert partial.run("a", lambda d: pytest.fail("must not rerun")) == str(tmp_path / "a" / "final")


def test_summary_table_has_a_row_per_stage_and_a_column_per_domain():
    text = summary_table({"accuracy": {"sft": {"math": 0.25, "code": 0.5}, "opd": {"math": 0.75, "code": 1.0}},
                          "seconds": {"sft": 12.4}})
    lines = text.splitlines()
    assert lines[0] == "| stage | math | code | time (s) |"
    assert lines[2] == "| sft | 0.250 | 0.500 | 12 |" and lines[3] == "| opd | 0.750 | 1.000 |  |"


def test_summary_table_states_the_claim_per_domain():
    """The second table: SFT -> specialist -> OPD per domain, the student's fraction of its teacher, and the
    specialist's GRPO reward at the start and the end."""
    text = summary_table({"accuracy": {"sft": {"math": 0.25}, "grpo-math": {"math": 0.5}, "opd": {"math": 0.4}},
                          "seconds": {}, "grpo_reward": {"math": {"start": 0.125, "end": 0.5, "window": 3,
                                                                  "accuracy_start": 0.25, "accuracy_end": 0.125}},
                          "config": {"grpo_pool": 128}, "heldout_n": {"math": 64}})
    lines = text.splitlines()
    # each accuracy with its binomial standard error on 64 problems: sqrt(0.25 * 0.75 / 64) = 0.054
    assert ("| math | 0.250 ± 0.054 | 0.500 ± 0.062 | 0.400 ± 0.061 | 0.80 | 0.125 -> 0.500 | 0.250 -> 0.125 |"
            in lines)
    assert "64 math problems" in text and "last 3 steps, on a fixed pool of 128 training problems" in lines[-1]


def test_grpo_reward_change_averages_a_window_at_each_end():
    rows = [{"step": 0, "eval_acc": 0.1}] + [{"step": i + 1, "reward": float(i)} for i in range(20)]
    change = grpo_reward_change(rows)
    k = change["window"]
    assert k == 4 and change["steps"] == 20                  # a fifth of 20 steps
    assert change["start"] == sum(range(k)) / k and change["end"] == sum(range(20 - k, 20)) / k
    assert grpo_reward_change([{"step": 1, "reward": 0.5}]) == {"start": 0.5, "end": 0.5, "window": 1, "steps": 1}
    assert grpo_reward_change([{"step": 0, "eval_acc": 0.1}]) == {}
    rows = [{"step": i + 1, "reward": 0.5 + i / 40, "accuracy": 0.5 - i / 40} for i in range(10)]
    change = grpo_reward_change(rows)                        # partial credit: reward up while accuracy falls
    assert change["window"] == 2 and change["end"] > change["start"]
    assert change["accuracy_start"] == (0.5 + 0.475) / 2 and change["accuracy_end"] == (0.3 + 0.275) / 2


def test_bad_config_is_refused():
    with pytest.raises(InvalidArgument, match="sft_steps"):
        PipelineConfig(sft_steps=0).check()
    with pytest.raises(InvalidArgument, match="grpo_pool"):
        PipelineConfig(grpo_pool=-1).check()
    with pytest.raises(InvalidArgument, match="sampler"):
        PipelineConfig(sampler="vllm").check()


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path):
    cfg = PipelineConfig(sft_examples=40, sft_steps=3, sft_batch_size=8, grpo_steps=1, grpo_generations=2,
                         grpo_batch_prompts=2, opd_steps=1, opd_batch_prompts=2, max_new_tokens=4,
                         eval_problems=2, progress=False)
    summary = run_pipeline(str(tmp_path), cfg)
    stages = ["base", "sft", "grpo-math", "grpo-instruct", "opd", "offpolicy"]
    assert list(summary["accuracy"]) == stages
    assert all(0 <= a <= 1 for acc in summary["accuracy"].values() for a in acc.values())
    assert set(summary["grpo_reward"]) == {"math", "instruct"} and summary["grpo_reward"]["math"]["steps"] == 1
    for name in ("summary.md", "summary.json", "accuracy.png", "reward.png", "distill.png"):
        assert os.path.getsize(tmp_path / name) > 0
    for stage in stages[1:]:
        assert os.path.isfile(tmp_path / stage / "metrics.jsonl"), stage
        assert os.path.isfile(tmp_path / stage / "final" / "tokenizer.json"), stage
    assert json.loads((tmp_path / "summary.json").read_text())["checkpoints"]["opd"].endswith("opd/final")


class _SmallHeldout:
    """An environment with exactly `size` held-out problems, refusing more as the real ones do."""

    def __init__(self, size):
        self.size = size

    def heldout(self, n):
        if n > self.size:
            raise InvalidArgument(f"only {self.size} held-out problems")
        return list(range(n))


@pytest.mark.parametrize("size, asked, expected", [(74, 400, 74), (400, 400, 400), (500, 400, 400), (0, 8, 0),
                                                   (1, 8, 1)])
def test_heldout_size_is_the_request_or_all_a_domain_has(size, asked, expected):
    assert heldout_size(_SmallHeldout(size), asked) == expected


def test_four_domain_pipeline_writes_every_stage_domain_cell_and_stage_seconds(tmp_path, monkeypatch):
    """The GPU run's path (pre-training, four domains, the mixed GRPO baseline, time caps) on the micro model,
    a step or two per stage: summary.json has an accuracy for every stage x domain, each stage's seconds and
    steps, and the issue's targets computed from them. (The plots, a third of this run's CPU time, are left
    out; test_tiny_pipeline_end_to_end draws them.)"""
    import dsv4.posttrain.curves as curves
    import dsv4.posttrain.distill_run as distill_run
    import dsv4.posttrain.pipeline as pipeline
    for module in (curves, distill_run, pipeline):
        monkeypatch.setattr(module, "plot_metrics", lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "_plot", lambda *a, **k: None)
    domains = ["math", "code", "instruct", "agent"]
    cfg = PipelineConfig(envs=tuple(domains), levels={"instruct": "hard"}, model="micro", vocab_size=400, tokenizer_examples=40,
                         pretrain_steps=2, pretrain_examples=8, pretrain_batch_size=4, pretrain_seq_len=64,
                         sft_examples=8, sft_steps=2, sft_batch_size=4, grpo_steps=1, grpo_generations=2,
                         grpo_batch_prompts=2, grpo_pool=4, opd_steps=1, opd_batch_prompts=4, max_new_tokens=4,
                         eval_problems=2, mixed_grpo=True, stage_minutes=5.0, progress=False)
    summary = run_pipeline(str(tmp_path), cfg)
    saved = json.loads((tmp_path / "summary.json").read_text())
    stages = ["base", "sft", *[f"grpo-{d}" for d in domains], "opd", "offpolicy", "grpo-mixed"]
    assert list(saved["accuracy"]) == stages
    for stage in stages:
        assert list(saved["accuracy"][stage]) == domains, stage
        assert all(0 <= a <= 1 for a in saved["accuracy"][stage].values())
    assert set(saved["seconds"]) == {"base", "pretrain", *stages[1:], "eval"}
    assert all(s > 0 for s in saved["seconds"].values())
    assert saved["gpu_seconds"] == {} and saved["device"] == "cpu"
    # each specialist took its one step; the mixed baseline the four domains' summed (equal student compute)
    assert saved["steps"] == {"pretrain": 2, "sft": 2, **{f"grpo-{d}": 1 for d in domains}, "opd": 1,
                              "offpolicy": 1, "grpo-mixed": 4}
    # every training stage logged its first step's time (outside its cap); none was asked for 20 steps, so none
    # is flagged for stopping short of them
    assert set(saved["warmup_s"]) == {"pretrain", *stages[1:]} and all(w > 0 for w in saved["warmup_s"].values())
    assert saved["too_few_steps"] == {}
    t = saved["targets"]
    assert set(t["specialist_minus_sft"]) == set(domains)
    grpo_time = sum(saved["seconds"][f"grpo-{d}"] for d in domains)
    assert t["opd_over_specialists_grpo_time"] == pytest.approx(saved["seconds"]["opd"] / grpo_time)
    md = (tmp_path / "summary.md").read_text()
    assert "| grpo-mixed |" in md and "pretrain" in md and summary["accuracy"] == saved["accuracy"]
    assert saved["levels"] == {"math": "easy", "code": "easy", "instruct": "hard", "agent": "easy"}
    assert "| instruct (hard) |" in md and "| math (easy) |" in md
    rows = [json.loads(line) for line in (tmp_path / "grpo-mixed" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_acc" in r]
    assert all(f"eval_acc/{d}" in evals[-1] for d in domains)   # the mixed run trains and evaluates every domain


def test_model_sizes_and_a_bad_one():
    from dsv4.posttrain.pipeline import model_config
    assert model_config("micro", 300).vocab_size == 300
    assert model_config("tiny", 300).dim == 128 and model_config("small", 300).dim == 768
    mini = model_config("mini", 1000)
    assert model_config("tiny", 1000).dim < mini.dim < model_config("small", 1000).dim
    with pytest.raises(InvalidArgument, match="model='huge'"):
        PipelineConfig(model="huge").check()
    with pytest.raises(InvalidArgument, match="pretrain"):
        PipelineConfig(base="/some/dir", pretrain_steps=3).check()


def test_stages_a_cap_stopped_short_of_20_steps_are_flagged_in_the_summary():
    steps = {"pretrain": 1, "sft": 19, "grpo-math": 20, "opd": 3}
    asked = {"pretrain": 3000, "sft": 1500, "grpo-math": 80, "opd": 3}
    assert too_few_steps(steps, asked) == {"pretrain": 1, "sft": 19}     # opd took all 3 it was asked for
    summary = {"accuracy": {"base": {"math": 0.0}, "sft": {"math": 0.0}}, "seconds": {"sft": 50.0},
               "too_few_steps": too_few_steps(steps, asked), "warmup_s": {"sft": 41.5}}
    md = summary_table(summary)
    assert md.startswith("**too few steps: raise --minutes**") and "pretrain 1, sft 19" in md
    assert "sft 41.5" in md
    del summary["too_few_steps"]
    assert "too few steps" not in summary_table(summary)


@pytest.mark.parametrize("flag, compiled", [([], False), (["--compile"], True), (["--no-compile"], False)])
def test_compile_flag_reaches_the_run_as_the_training_compile_switch(tmp_path, monkeypatch, flag, compiled):
    """--compile/--no-compile (default off) sets ops.training_compile for the run only."""
    import dsv4.posttrain.pipeline as pipeline
    from dsv4.cli import main
    from dsv4.ops.compiled import torch_compile
    monkeypatch.delenv("DSV4_COMPILE", raising=False)
    seen = []

    def fake(out, cfg):
        seen.append((cfg.compile, torch_compile.training_compiled()))
        return {"total_seconds": 0.0}

    monkeypatch.setattr(pipeline, "_run_pipeline", fake)
    monkeypatch.setattr(pipeline, "summary_table", lambda s: "")
    before = torch_compile.training_compiled()
    assert main(["posttrain", "--out", str(tmp_path), *flag]) == 0
    assert seen == [(compiled, compiled)] and torch_compile.training_compiled() == before
