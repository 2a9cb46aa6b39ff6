"""Instruction following: a reply must meet constraints that code can check (case, keywords, length, JSON with
given keys, a bullet list of N items, a closing phrase). The reward is the fraction of constraints met, with
each constraint's verdict in `info`, so a reply that misses one constraint still tells GRPO which one.

Levels: `easy` is one short instruction on a one-word reply ("Reply with the word apple in uppercase."), which a
~3M-parameter model learns in a minute or two of CPU SFT; `medium` asks for a short text on a topic under two
constraints; `hard` adds JSON output and three or four constraints.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any

from .base import Problem, Reward
from .split import HashSplit, check_level, final_assistant, problem_id

__all__ = ["Constraint", "InstructEnv", "KINDS"]

WORDS = ("apple", "river", "stone", "cloud", "green", "happy", "light", "table", "water", "music", "tiger",
         "bread", "chair", "dream", "flame", "glass", "heart", "house", "lemon", "money", "night", "ocean",
         "piano", "queen", "robot", "smile", "snake", "storm", "sugar", "train", "whale", "zebra", "candle",
         "garden", "forest", "rabbit", "silver", "winter", "planet", "butter", "cookie", "dragon", "button",
         "castle", "pepper", "turtle", "violet", "yellow")
EASY_TEMPLATES = ("Reply with the word {w} in {case}.", "Write {w} in {case}.", "Give me the word {w}, {case}.",
                  "Only the word {w}, in {case}.", "Say {w} in {case}.", "Answer with {w} in {case}.")
TOPICS = {
    "the sea": ("waves", "salt", "blue", "fish", "tide", "sand"),
    "a forest": ("trees", "moss", "birds", "green", "quiet", "leaves"),
    "winter": ("snow", "cold", "ice", "white", "frost", "wind"),
    "a city": ("streets", "cars", "lights", "noise", "towers", "crowds"),
    "music": ("song", "drums", "melody", "rhythm", "notes", "voice"),
    "breakfast": ("eggs", "toast", "coffee", "jam", "milk", "butter"),
    "the night sky": ("stars", "moon", "dark", "planets", "comets", "owls"),
    "a garden": ("flowers", "roses", "soil", "bees", "seeds", "rain"),
}
JSON_KEYS = ("title", "summary", "keywords", "mood")
PHRASES = ("That is all.", "The end.", "Thank you.")
KINDS = ("uppercase", "lowercase", "include", "avoid", "max_words", "min_words", "max_chars", "json_keys",
         "bullets", "ends_with")
_BULLET = re.compile(r"^\s*[-*] \S")


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", text, flags=re.IGNORECASE) is not None


@dataclass(frozen=True)
class Constraint:
    """One checkable demand on the reply: `kind` (one of KINDS) and its argument."""
    kind: str
    arg: Any = None

    @property
    def name(self) -> str:
        """How `info` and the logs name it, e.g. 'include:paws', 'json_keys:title,mood'."""
        if self.arg is None:
            return self.kind
        arg = ",".join(self.arg) if isinstance(self.arg, (list, tuple)) else self.arg
        return f"{self.kind}:{arg}"

    def describe(self) -> str:
        """The sentence of the prompt that asks for it."""
        a = self.arg
        templates = {
            "uppercase": lambda: "Use only uppercase letters.",
            "lowercase": lambda: "Use only lowercase letters.",
            "include": lambda: f"Include the word '{a}'.",
            "avoid": lambda: f"Do not use the word '{a}'.",
            "max_words": lambda: f"Use at most {a} words.",
            "min_words": lambda: f"Use at least {a} words.",
            "max_chars": lambda: f"Use at most {a} characters.",
            "json_keys": lambda: f"Answer with a JSON object with exactly the keys {', '.join(map(repr, a))}.",
            "bullets": lambda: f"Answer with a bullet list of exactly {a} items, each line starting with '- '.",
            "ends_with": lambda: f"End your reply with: {a}",
        }
        return templates[self.kind]()

    def check(self, text: str) -> bool:
        a = self.arg
        if self.kind == "uppercase":
            return any(c.isalpha() for c in text) and text == text.upper()
        if self.kind == "lowercase":
            return any(c.isalpha() for c in text) and text == text.lower()
        if self.kind == "include":
            return _has_word(text, a)
        if self.kind == "avoid":
            return not _has_word(text, a)
        if self.kind == "max_words":
            return len(text.split()) <= a
        if self.kind == "min_words":
            return len(text.split()) >= a
        if self.kind == "max_chars":
            return len(text) <= a
        if self.kind == "json_keys":
            try:
                obj = json.loads(text)
            except ValueError:
                return False
            return isinstance(obj, dict) and set(obj) == set(a)
        if self.kind == "bullets":
            return sum(bool(_BULLET.match(line)) for line in text.splitlines()) == a
        if self.kind == "ends_with":
            return text.rstrip().lower().endswith(a.lower())
        raise ValueError(f"unknown constraint kind {self.kind!r}; expected one of {KINDS}")


def _case(text: str, constraints: list[Constraint]) -> str:
    kinds = {c.kind for c in constraints}
    return text.upper() if "uppercase" in kinds else text.lower() if "lowercase" in kinds else text


class InstructEnv(HashSplit):
    """Replies under checkable constraints. `answer` holds the constraints and a reply meeting them all."""
    name = "instruct"
    max_turns = 1

    def __init__(self, level: str = "easy"):
        self.level = check_level(self.name, level)

    # ------------------------------------------------------------------ problems
    def _problem(self, prompt: str, constraints: list[Constraint], reply: str) -> tuple[str, Problem]:
        failed = [c.name for c in constraints if not c.check(reply)]
        if failed:   # the generator's own reply must pass, or the SFT targets would teach violations
            raise AssertionError(f"instruct generator wrote a reply {reply!r} that fails {failed}")
        answer = {"constraints": [[c.kind, list(c.arg) if isinstance(c.arg, tuple) else c.arg]
                                  for c in constraints], "reply": reply}
        return prompt, Problem(self.name, problem_id(self.name, self.level, prompt),
                               [{"role": "user", "content": prompt}], answer, {"level": self.level})

    def _make(self, rng: random.Random) -> tuple[str, Problem]:
        return self._make_easy(rng) if self.level == "easy" else self._make_topic(rng)

    def _make_easy(self, rng: random.Random) -> tuple[str, Problem]:
        word, case, template = rng.choice(WORDS), rng.choice(("uppercase", "lowercase")), rng.choice(EASY_TEMPLATES)
        constraints = [Constraint("include", word), Constraint(case), Constraint("max_words", 1)]
        return self._problem(template.format(w=word, case=case), constraints, _case(word, constraints))

    def _make_topic(self, rng: random.Random) -> tuple[str, Problem]:
        hard = self.level == "hard"
        topic = rng.choice(sorted(TOPICS))
        words = list(TOPICS[topic])
        rng.shuffle(words)
        avoid, pool = words[-1], words[:-1]
        fmt = rng.choice(("plain", "bullets", "json") if hard else ("plain", "bullets"))
        n_extra = rng.randint(2, 3) if hard else (1 if fmt != "plain" else 2)
        extras = ["include", "avoid", "length"] + ([] if fmt == "json" else ["case", "ends_with"])
        picked = rng.sample(extras, min(n_extra, len(extras)))

        constraints: list[Constraint] = []
        if fmt == "bullets":
            n = rng.randint(2, 4)
            constraints.append(Constraint("bullets", n))
            body = "\n".join(f"- {w}" for w in pool[:n])
            used = pool[:n]
        elif fmt == "json":
            keys = tuple(sorted(rng.sample(JSON_KEYS, rng.randint(2, 3))))
            constraints.append(Constraint("json_keys", keys))
            used = pool[:2]
            values = {"title": topic, "summary": f"{topic} has {used[0]} and {used[1]}",
                      "keywords": list(used), "mood": "calm"}
            body = json.dumps({k: values[k] for k in keys})
            if "summary" not in keys and "keywords" not in keys:
                used = []
        else:
            used = pool[:3]
            body = f"{topic.capitalize()} has {used[0]}, {used[1]} and {used[2]}."
        if "include" in picked and used:
            constraints.append(Constraint("include", rng.choice(used)))
        if "avoid" in picked:
            constraints.append(Constraint("avoid", avoid))
        if "case" in picked:
            constraints.append(Constraint(rng.choice(("uppercase", "lowercase"))))
        if "ends_with" in picked:
            phrase = rng.choice(PHRASES)
            constraints.append(Constraint("ends_with", phrase))
            body += ("\n" if fmt == "bullets" else " ") + phrase
        reply = _case(body, constraints)
        if "length" in picked:   # bounds set around the reply, so it always fits
            kind = rng.choice(("max_words", "min_words", "max_chars"))
            bound = {"max_words": len(reply.split()) + rng.randint(0, 3),
                     "min_words": max(1, len(reply.split()) - rng.randint(0, 2)),
                     "max_chars": len(reply) + rng.randint(0, 10)}[kind]
            constraints.append(Constraint(kind, bound))
        prompt = f"Write about {topic}. " + " ".join(c.describe() for c in constraints)
        return self._problem(prompt, constraints, reply)

    # ------------------------------------------------------------------ the Environment protocol
    def demonstrate(self, problem: Problem) -> list[dict]:
        return [{"role": "assistant", "content": problem.answer["reply"]}]

    def tool_results(self, problem: Problem, tool_calls: list[dict]) -> list[dict]:
        return []

    def constraints(self, problem: Problem) -> list[Constraint]:
        return [Constraint(kind, tuple(arg) if isinstance(arg, list) else arg)
                for kind, arg in problem.answer["constraints"]]

    def reward(self, problem: Problem, turns: list[dict]) -> Reward:
        constraints = self.constraints(problem)
        final = final_assistant(turns)
        if final is None:
            return Reward(0.0, False, {"error": "no final assistant reply",
                                       "verdicts": {c.name: False for c in constraints}})
        text = (final.get("content") or "").strip()
        verdicts = {c.name: c.check(text) for c in constraints}
        met = sum(verdicts.values())
        return Reward(met / len(constraints), met == len(constraints),
                      {"verdicts": verdicts, "failed": [k for k, ok in verdicts.items() if not ok]})
