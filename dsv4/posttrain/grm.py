"""A generative reward model (GRM): the policy model itself judges an answer, reading a rubric in the chat format
and replying "Verdict: good" or "Verdict: bad", for tasks no rule can check.

`GenerativeRewardModel.score_batch` renders one judge prompt per (problem, answer), decodes all of them greedily
in one batch, and parses each verdict; a reply that is not exactly a verdict counts as *unparsed* (score 0) and
is reported as such, never guessed. `judge_demonstrations` writes the SFT data that teaches a model to judge
(rubric prompt -> the rule's verdict); `agreement` measures how often its verdicts match the hidden rule-based
labels on held-out problems; `JudgedEnv` puts the GRM in place of an environment's reward for GRPO.
"""
from __future__ import annotations

import random
import re
from typing import Sequence

from ..errors import InvalidArgument
from ..generate.chat import EOS, encode_chat
from .envs.base import Environment, EnvironmentWrapper, Problem, Reward
from .envs.split import final_assistant

__all__ = ["GenerativeRewardModel", "JudgedEnv", "JUDGE_SYSTEM", "judge_messages", "verdict_text",
           "parse_verdict", "judge_demonstrations", "agreement", "UNPARSED"]

JUDGE_SYSTEM = "Judge the answer by the rubric. Reply with 'Verdict: good' or 'Verdict: bad'."
UNPARSED = "unparsed"
_VERDICT = re.compile(r"\s*verdict:\s*(good|bad)\s*\.?\s*", flags=re.IGNORECASE)


def _question(problem: Problem) -> str:
    users = [m.get("content") or "" for m in problem.messages if m.get("role") == "user"]
    if not users:
        raise InvalidArgument(f"problem {problem.id}: its messages have no user turn to judge an answer to")
    return users[-1]


def judge_messages(problem: Problem, answer: str, rubric: str | None = None) -> list[dict]:
    """The judge's prompt: the rubric (`rubric`, else the problem's `meta['rubric']`), question and answer."""
    rubric = rubric if rubric is not None else problem.meta.get("rubric")
    if not rubric:
        raise InvalidArgument(f"problem {problem.id} has no meta['rubric'] and no rubric was given to the judge")
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"Rubric: {rubric}\nQuestion: {_question(problem)}\nAnswer: {answer}"}]


def verdict_text(good: bool) -> str:
    return f"Verdict: {'good' if good else 'bad'}"


def parse_verdict(text: str) -> str:
    """'good' or 'bad' when the judge's reply (up to EOS) is exactly a verdict; UNPARSED otherwise."""
    m = _VERDICT.fullmatch(text.split(EOS, 1)[0])
    return m.group(1).lower() if m else UNPARSED


def _verdict_reward(text: str) -> Reward:
    verdict = parse_verdict(text)
    return Reward(float(verdict == "good"), verdict == "good", {"verdict": verdict, "judge_text": text})


class GenerativeRewardModel:
    """Scores answers with `model` as the judge (greedy decoding of at most `max_new_tokens` tokens).

    `rubric`: one rubric for every problem; None reads each problem's `meta['rubric']`. `complete(prompts)` is
    the only place the model runs (texts in, reply texts out), so a scripted judge can stand in for it.
    """

    def __init__(self, model, tokenizer, rubric: str | None = None, *, max_new_tokens: int = 8,
                 batch_size: int = 32):
        if max_new_tokens < 1 or batch_size < 1:
            raise InvalidArgument(f"GenerativeRewardModel: max_new_tokens={max_new_tokens} and "
                                  f"batch_size={batch_size} must be >= 1")
        self.model, self.tokenizer, self.rubric = model, tokenizer, rubric
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def prompt(self, problem: Problem, answer: str) -> str:
        """The judge prompt text, ending with the assistant opener (non-thinking)."""
        return encode_chat(judge_messages(problem, answer, self.rubric))

    def complete(self, prompts: list[str]) -> list[str]:
        """The judge's greedy reply to each prompt text, through EOS when it stops there."""
        from ..generate import generate   # torch comes with it; the data helpers above do not need it
        eos = self.tokenizer.eos_id
        out = []
        for start in range(0, len(prompts), self.batch_size):
            ids = [self.tokenizer.encode(p) for p in prompts[start:start + self.batch_size]]
            replies = generate(self.model, ids, self.max_new_tokens, temperature=0.0,
                               stop_tokens=[eos] if eos is not None else [])
            out += [self.tokenizer.decode(r) for r in replies]
        return out

    def score_batch(self, items: Sequence[tuple[Problem, str]]) -> list[Reward]:
        """One Reward per (problem, answer): score 1 for 'good', 0 for 'bad' or an unparsed reply."""
        if not items:
            return []
        replies = self.complete([self.prompt(p, a) for p, a in items])
        return [_verdict_reward(text) for text in replies]

    def score(self, problem: Problem, answer: str) -> Reward:
        return self.score_batch([(problem, answer)])[0]


def judge_demonstrations(env, n: int, seed: int = 0) -> list[list[dict]]:
    """`n` judge SFT conversations on fresh (not held-out) problems, half good answers: the rubric prompt, then
    the rule's verdict as the assistant turn. `env` must offer `judge_examples(n, rng)` (RubricEnv does)."""
    return [judge_messages(p, a) + [{"role": "assistant", "content": verdict_text(good)}]
            for p, a, good in env.judge_examples(n, random.Random(seed))]


def agreement(grm: GenerativeRewardModel, env, n: int) -> dict:
    """How often the GRM's verdict matches the hidden rule label on `n` held-out (problem, answer) pairs.

    Returns rate (unparsed replies count as disagreement), n, unparsed (their count) and confusion:
    {label: {verdict: count}} with labels 'good'/'bad' and verdicts 'good'/'bad'/'unparsed'."""
    examples = env.judge_examples(n)
    rewards = grm.score_batch([(p, a) for p, a, _ in examples])
    confusion = {label: {v: 0 for v in ("good", "bad", UNPARSED)} for label in ("good", "bad")}
    for (_, _, good), reward in zip(examples, rewards):
        confusion["good" if good else "bad"][reward.info["verdict"]] += 1
    agree = confusion["good"]["good"] + confusion["bad"]["bad"]
    unparsed = confusion["good"][UNPARSED] + confusion["bad"][UNPARSED]
    return {"rate": agree / n if n else 0.0, "n": n, "unparsed": unparsed, "confusion": confusion}


class JudgedEnv(EnvironmentWrapper):
    """`env` with the GRM's verdict as its reward (what GRPO trains on for a rubric task). The hidden rule label
    rides along in `info['rule_correct']` for logging only."""

    def __init__(self, env: Environment, grm: GenerativeRewardModel):
        super().__init__(env)
        self.grm = grm

    def reward_batch(self, items: Sequence[tuple[Problem, list[dict]]]) -> list[Reward]:
        """Rewards of many rollouts with one batched judging pass (a missing final reply scores 0 unjudged)."""
        finals = [final_assistant(turns) for _, turns in items]
        judged = iter(self.grm.score_batch([(p, (f.get("content") or "").strip())
                                            for (p, _), f in zip(items, finals) if f is not None]))
        out = []
        for (problem, turns), final in zip(items, finals):
            rule = self.env.reward(problem, turns).correct
            if final is None:
                out.append(Reward(0.0, False, {"verdict": UNPARSED, "error": "no final assistant reply",
                                               "rule_correct": rule}))
            else:
                r = next(judged)
                out.append(Reward(r.score, r.correct, {**r.info, "rule_correct": rule}))
        return out

    def reward(self, problem: Problem, turns: list[dict]) -> Reward:
        return self.reward_batch([(problem, turns)])[0]
