"""Rubric-graded short answers: a task treated as non-verifiable, graded in training by a generative reward model
(`dsv4.posttrain.grm`) that reads the rubric, never by code.

The policy is asked to describe a thing in a few words; the rubric (in `problem.meta["rubric"]`, shown to the
judge) asks that the answer name the thing, mention one of its real parts, name no part of another thing, and
stay under a word limit. The same rule, in code, is the hidden label: `reward` returns it for *evaluation
only* (how often the GRM agrees with it is what `grm.agreement` measures). `judge_examples` writes answers of
known quality, good and bad in equal numbers, for the judge's SFT data and for that agreement measurement.
"""
from __future__ import annotations

import random
import re

from .base import Problem, Reward
from .split import HashSplit, check_level, final_assistant, problem_id

__all__ = ["RubricEnv", "THINGS", "BAD_KINDS"]

THINGS = {
    "cat": ("fur", "whiskers", "tail", "paws"),
    "bird": ("wings", "feathers", "beak"),
    "fish": ("fins", "scales", "gills"),
    "tree": ("leaves", "roots", "bark", "branches"),
    "car": ("wheels", "engine", "doors"),
    "house": ("roof", "walls", "windows"),
    "book": ("pages", "cover", "spine"),
    "boat": ("sail", "hull", "oars"),
    "flower": ("petals", "stem", "pollen"),
    "clock": ("hands", "dial", "gears"),
    "bicycle": ("pedals", "chain", "saddle"),
    "guitar": ("strings", "frets", "neck"),
}
N_THINGS = {"easy": 6, "medium": 9, "hard": 12}
QUESTIONS = ("Describe a {t} in at most {k} words.", "What is a {t} like? Answer in at most {k} words.",
             "Tell me about a {t} in at most {k} words.", "Describe a {t}, {k} words at most.",
             "In at most {k} words, what is a {t}?")
WORD_LIMITS = (4, 5, 6, 7, 8)
BAD_KINDS = ("wrong_part", "no_part", "no_thing", "too_long")


def _has(text: str, word: str) -> bool:
    return re.search(rf"(?<![a-z]){re.escape(word)}(?![a-z])", text.lower()) is not None


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class RubricEnv(HashSplit):
    """Short descriptions graded by a rubric. `answer` = {"thing", "parts", "other_parts", "max_words"}."""
    name = "rubric"
    max_turns = 1

    def __init__(self, level: str = "easy"):
        self.level = check_level(self.name, level)
        self.things = sorted(THINGS)[:N_THINGS[level]]

    # ------------------------------------------------------------------ problems
    def _make(self, rng: random.Random) -> tuple[str, Problem]:
        thing, k, template = rng.choice(self.things), rng.choice(WORD_LIMITS), rng.choice(QUESTIONS)
        question = template.format(t=thing, k=k)
        rubric = f"Good if it names the {thing}, one of its parts, no part of another thing, at most {k} words."
        others = sorted({p for t in self.things if t != thing for p in THINGS[t]})
        answer = {"thing": thing, "parts": list(THINGS[thing]), "other_parts": others, "max_words": k}
        return question, Problem(self.name, problem_id(self.name, self.level, question),
                                 [{"role": "user", "content": question}], answer,
                                 {"level": self.level, "rubric": rubric})

    def label(self, problem: Problem, text: str) -> dict[str, bool]:
        """The hidden rule, clause by clause; the answer is good when every clause holds."""
        a = problem.answer
        return {"names_thing": _has(text, a["thing"]),
                "mentions_part": any(_has(text, p) for p in a["parts"]),
                "no_other_part": not any(_has(text, p) for p in a["other_parts"]),
                "short": 0 < len(text.split()) <= a["max_words"]}

    def good_answer(self, problem: Problem, rng: random.Random) -> str:
        a = problem.answer
        thing, part = a["thing"], rng.choice(a["parts"])
        art = _article(thing).capitalize()
        return rng.choice((f"{art} {thing} has {part}.", f"{art} {thing} with {part}.",
                           f"The {thing} has {part}."))

    def bad_answer(self, problem: Problem, rng: random.Random, kind: str) -> str:
        """An answer that breaks the rubric in the way `kind` (one of BAD_KINDS) says."""
        a = problem.answer
        thing, art = a["thing"], _article(a["thing"]).capitalize()
        if kind == "wrong_part":
            return f"{art} {thing} has {rng.choice(a['other_parts'])}."
        if kind == "no_part":
            return f"{art} {thing} is {rng.choice(('nice', 'common', 'useful', 'old'))}."
        if kind == "no_thing":
            return f"It has {rng.choice(a['parts'])}."
        if kind == "too_long":
            filler = "and it is really very nice to look at every day".split()
            words = f"{art} {thing} has {rng.choice(a['parts'])}".split()
            return " ".join(words + filler[:a["max_words"] + 1 - len(words)]) + "."
        raise ValueError(f"unknown bad answer kind {kind!r}; expected one of {BAD_KINDS}")

    def judge_examples(self, n: int, rng: random.Random | None = None) -> list[tuple[Problem, str, bool]]:
        """`n` (problem, answer, is_good) triples, good and bad alternating. With `rng`: on fresh problems (the
        judge's training data); without: on the held-out problems, cycled, from a fixed seed (evaluation)."""
        fixed = random.Random(f"rubric-judge-{self.level}")
        pool = None if rng is not None else self.heldout(min(n, 12))
        out = []
        for i in range(n):
            problem = self.sample(rng) if rng is not None else pool[i % len(pool)]
            r = rng if rng is not None else fixed
            good = i % 2 == 0
            text = self.good_answer(problem, r) if good else self.bad_answer(problem, r, r.choice(BAD_KINDS))
            if all(self.label(problem, text).values()) != good:   # the writers must agree with the rule
                raise AssertionError(f"rubric writer made {text!r} for {problem.id}, meant to be good={good}")
            out.append((problem, text, good))
        return out

    # ------------------------------------------------------------------ the Environment protocol
    def demonstrate(self, problem: Problem) -> list[dict]:
        return [{"role": "assistant", "content": self.good_answer(problem, random.Random(problem.id))}]

    def tool_results(self, problem: Problem, tool_calls: list[dict]) -> list[dict]:
        return []

    def reward(self, problem: Problem, turns: list[dict]) -> Reward:
        """The hidden rule-based label: for evaluation, not for training (train on the GRM's verdict)."""
        final = final_assistant(turns)
        if final is None:
            return Reward(0.0, False, {"error": "no final assistant reply"})
        clauses = self.label(problem, (final.get("content") or "").strip())
        good = all(clauses.values())
        return Reward(float(good), good, {"clauses": clauses})
