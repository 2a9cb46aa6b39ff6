"""Multi-teacher OPD on the tiny preset: a teacher equal to the student gives zero KL and no update, training
toward another teacher lowers the held-out KL, each domain's rows go to that domain's teacher, and the
off-policy baseline trains on the teachers' own samples."""
from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch

import dsv4
from dsv4.errors import InvalidArgument
from dsv4.posttrain.distill import DistillConfig, _sample, distill, make_batch, opd_loss
from dsv4.posttrain.distill import sample_trajectories
from dsv4.posttrain.envs.base import Problem, Reward
from dsv4.train.tokenizer import train_bpe

LETTERS = "abcdefgh"


class EchoEnv:
    """'Say x.' -> 'x': a single-turn domain small enough for a random tiny model."""
    max_turns = 1

    def __init__(self, name: str):
        self.name = name

    def _problem(self, pid: str, letter: str) -> Problem:
        return Problem(self.name, pid, [{"role": "user", "content": f"{self.name}: say {letter}."}], letter)

    def sample(self, rng: random.Random) -> Problem:
        return self._problem(f"s{rng.randrange(10**9)}", rng.choice(LETTERS))

    def heldout(self, n: int) -> list[Problem]:
        return [self._problem(f"h{i}", LETTERS[i % len(LETTERS)]) for i in range(n)]

    def demonstrate(self, problem: Problem) -> list[dict]:
        return [{"role": "assistant", "content": problem.answer}]

    def tool_results(self, problem, tool_calls):
        return []

    def reward(self, problem: Problem, turns: list[dict]) -> Reward:
        ok = bool(turns) and turns[-1]["content"].strip() == problem.answer
        return Reward(float(ok), ok)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"<｜User｜>{d}: say {c}.<｜Assistant｜></think>{c}<｜end▁of▁sentence｜>" for d in ("math", "code")
             for c in LETTERS]
    return train_bpe(texts * 4, 300)


def tiny(tokenizer, seed: int, std: float = 0.02) -> dsv4.Transformer:
    cfg = dataclasses.replace(dsv4.ModelConfig.preset("tiny"), vocab_size=tokenizer.vocab_size)
    torch.manual_seed(seed)
    return dsv4.Transformer(cfg).init_weights(seed=seed, std=std)


def frozen(model: dsv4.Transformer) -> dsv4.Transformer:
    return copy.deepcopy(model).requires_grad_(False).eval()


ENVS = {"math": EchoEnv("math"), "code": EchoEnv("code")}
CFG = dict(batch_prompts=4, max_new_tokens=6, eval_prompts=3, eval_every=100, chunk=16)


def _mixed_batch(student, tokenizer):
    problems = [ENVS[d].sample(random.Random(i)) for i, d in enumerate(["math", "code", "math", "code"])]
    trajs = sample_trajectories(student, tokenizer, problems, ENVS, DistillConfig(**CFG), 1.0, seed=0)
    return make_batch(trajs, 0, tokenizer.eos_id, torch.device("cpu"))


def test_teacher_equal_to_student_gives_zero_kl_and_no_update(tokenizer):
    student = tiny(tokenizer, 0)
    teachers = {d: frozen(student) for d in ENVS}
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    rows = distill(student, teachers, tokenizer, ENVS, DistillConfig(steps=2, mtp_weight=0.0, **{**CFG, "eval_prompts": 0}),
                   progress=False)
    steps = [r for r in rows if "kl" in r]
    assert len(steps) == 2 and all(r["kl"] == 0.0 and r["kl/math"] == 0.0 and r["kl/code"] == 0.0 for r in steps)
    assert all(r["grad_norm"] == 0.0 for r in steps)
    for n, p in student.named_parameters():
        assert torch.equal(p, before[n]), n


def test_mtp_trains_on_detached_lanes(tokenizer):
    """With the MTP term on, a teacher equal to the student still leaves the trunk's gradient at zero; only the
    MTP block (and the embedding and head it shares) get one."""
    student = tiny(tokenizer, 0)
    teachers = {d: frozen(student) for d in ENVS}
    problems = [ENVS["math"].sample(random.Random(i)) for i in range(3)]
    trajs = sample_trajectories(student, tokenizer, problems, ENVS, DistillConfig(**CFG), 1.0, seed=0)
    batch = make_batch(trajs, len(student.mtp), tokenizer.eos_id, torch.device("cpu"))
    loss, parts = opd_loss(student, teachers, batch, mtp_weight=0.3)
    loss.backward()
    assert parts["kl"] == 0.0 and parts["mtp"] > 0
    trunk = {n: p.grad for n, p in student.named_parameters() if n.startswith("layers.") and p.grad is not None}
    mtp = {n: p.grad for n, p in student.named_parameters() if n.startswith("mtp.") and p.grad is not None}
    assert trunk and all(float(g.abs().max()) == 0.0 for g in trunk.values())
    assert mtp and any(float(g.abs().max()) > 0 for g in mtp.values())


def test_opd_lowers_heldout_kl_to_another_teacher(tokenizer):
    student = tiny(tokenizer, 0)
    teacher = frozen(tiny(tokenizer, 1, std=0.06))
    rows = distill(student, {"math": teacher}, tokenizer, {"math": ENVS["math"]},
                   DistillConfig(steps=4, lr=1e-2, **CFG), progress=False)
    evals = [r for r in rows if "heldout_kl/math" in r]
    assert [r["step"] for r in evals] == [0, 4]
    first, last = evals[0]["heldout_kl/math"], evals[-1]["heldout_kl/math"]
    assert first > 0.1 and last < 0.85 * first, (first, last)
    train_kl = [r["kl"] for r in rows if "kl" in r]
    assert train_kl[-1] < train_kl[0]


def test_each_domain_is_scored_by_its_own_teacher(tokenizer):
    student = tiny(tokenizer, 0)
    same, other = frozen(student), frozen(tiny(tokenizer, 1, std=0.06))
    batch = _mixed_batch(student, tokenizer)
    with torch.no_grad():
        _, kl = opd_loss(student, {"math": same, "code": other}, batch)
        _, swapped = opd_loss(student, {"math": other, "code": same}, batch)
    assert kl["kl/math"] == 0.0 and kl["kl/code"] > 0.05
    assert swapped["kl/code"] == 0.0 and swapped["kl/math"] > 0.05


def test_off_policy_trains_on_each_domains_teacher_samples(tokenizer):
    student = tiny(tokenizer, 0)
    teachers = {"math": frozen(tiny(tokenizer, 1, std=0.06)), "code": frozen(tiny(tokenizer, 2, std=0.06))}
    problems = [ENVS[d].sample(random.Random(i)) for i, d in enumerate(["math", "code", "code", "math"])]
    cfg = DistillConfig(off_policy=True, temperature=0.0, **CFG)
    trajs = _sample(student, teachers, tokenizer, problems, ENVS, cfg, seed=0)
    for p, t in zip(problems, trajs):
        want = sample_trajectories(teachers[p.domain], tokenizer, [p], ENVS, cfg, 0.0, seed=0)[0]
        assert t.problem is p and t.tokens == want.tokens
    rows = distill(student, teachers, tokenizer, ENVS, DistillConfig(steps=1, off_policy=True, optimizer="adamw",
                                                                      **{**CFG, "eval_prompts": 1}), progress=False)
    steps = [r for r in rows if "ce" in r]
    assert len(steps) == 1 and steps[-1]["mode"] == "offpolicy" and steps[-1]["student_tokens"] > 0
    assert {"ce/math", "ce/code", "heldout_acc/math", "heldout_kl/code"} <= set().union(*rows)


def test_missing_teacher_is_refused(tokenizer):
    student = tiny(tokenizer, 0)
    with pytest.raises(InvalidArgument, match="no teacher for domain"):
        distill(student, {"math": frozen(student)}, tokenizer, ENVS, DistillConfig(**CFG), progress=False)
