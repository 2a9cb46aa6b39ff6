"""Math with an exact answer: multi-step integer arithmetic ("3+5-2=?") and countdown ("use 3 5 7 to make 22
with + - *, each number once").

The answer is the last `Answer: ...` line of the final assistant message: an integer for arithmetic, an
expression for countdown. Countdown answers are checked by a small arithmetic parser (integers, + - *,
parentheses; never `eval`) for the value and for using exactly the given numbers. Problems are split into
train and held-out by a hash of their canonical form, so `sample` never returns a held-out problem.
"""
from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Union

from ...errors import InvalidArgument
from .base import Problem, Reward

__all__ = ["MathLevel", "LEVELS", "MathEnv", "ExpressionError", "parse_expression", "evaluate", "render", "final_answer"]

Node = Union[int, tuple]          # an integer literal or (op, left, right)
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}
_MAX_EXPRESSION_CHARS = 256
_EXHAUSTED_AFTER = 5000          # draws without a new held-out problem before heldout gives up
_HELDOUT_PER_MILLE = 100          # 10% of all problems are held out


@dataclass(frozen=True)
class MathLevel:
    name: str
    kinds: tuple[str, ...]        # "arith" and/or "countdown"
    terms: tuple[int, int]        # arithmetic: fewest and most operands
    max_operand: int              # arithmetic operands in [0, max_operand]
    ops: str                      # the operators problems use
    parentheses: bool             # arithmetic with parenthesised sub-expressions
    countdown_numbers: int        # how many numbers a countdown problem gives
    countdown_max: int            # countdown numbers in [1, countdown_max]
    short_prompt: bool            # "3+5-2=?" instead of a sentence (cheaper for tiny models)


LEVELS: dict[str, MathLevel] = {
    # a ~3M-parameter model learns this from a minute of SFT on CPU
    "easy": MathLevel("easy", ("arith",), (2, 3), 9, "+-", False, 3, 9, True),
    "medium": MathLevel("medium", ("arith", "countdown"), (3, 4), 20, "+-*", False, 3, 10, False),
    "hard": MathLevel("hard", ("arith", "countdown"), (4, 5), 99, "+-*", True, 4, 25, False),
}


class ExpressionError(ValueError):
    """Text that is not an expression of integers, + - * and parentheses."""


def parse_expression(text: str) -> Node:
    """The tree of an expression of non-negative integers, + - * and parentheses (usual precedence, left
    associative). Raises ExpressionError on anything else, on more than 256 characters or deep nesting."""
    if len(text) > _MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {_MAX_EXPRESSION_CHARS} characters")
    tokens = re.findall(r"\d+|[-+*()]|\S", text)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expr(depth: int) -> Node:
        node = term(depth)
        while peek() in ("+", "-"):
            node = (take(), node, term(depth))
        return node

    def term(depth: int) -> Node:
        node = factor(depth)
        while peek() == "*":
            node = (take(), node, factor(depth))
        return node

    def factor(depth: int) -> Node:
        if depth > 32:
            raise ExpressionError("parentheses nested too deeply")
        tok = peek()
        if tok is None:
            raise ExpressionError("expression ends early")
        take()
        if tok.isdigit():
            return int(tok)
        if tok == "(":
            node = expr(depth + 1)
            if peek() != ")":
                raise ExpressionError("unclosed parenthesis")
            take()
            return node
        raise ExpressionError(f"unexpected {tok!r}")

    tree = expr(0)
    if pos != len(tokens):
        raise ExpressionError(f"unexpected {tokens[pos]!r}")
    return tree


def evaluate(node: Node, steps: list[str] | None = None) -> int:
    """The value of a tree; each operation's `a op b=c` is appended to `steps` when given."""
    if isinstance(node, int):
        return node
    op, left, right = node
    a, b = evaluate(left, steps), evaluate(right, steps)
    value = a + b if op == "+" else a - b if op == "-" else a * b
    if steps is not None:
        steps.append(f"{a}{op}{b if b >= 0 else f'({b})'}={value}")
    return value


def render(node: Node) -> str:
    """The expression text of a tree with only the parentheses its precedence needs."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    left_text, right_text = render(left), render(right)
    if _precedence(left) < _PRECEDENCE[op]:
        left_text = f"({left_text})"
    if _precedence(right) < _PRECEDENCE[op] or (_precedence(right) == _PRECEDENCE[op] and op == "-"):
        right_text = f"({right_text})"
    return f"{left_text}{op}{right_text}"


def _precedence(node: Node) -> int:
    return 3 if isinstance(node, int) else _PRECEDENCE[node[0]]


def _leaves(node: Node) -> list[int]:
    return [node] if isinstance(node, int) else _leaves(node[1]) + _leaves(node[2])


def _random_tree(rng: random.Random, leaves: list[int], ops: str) -> Node:
    if len(leaves) == 1:
        return leaves[0]
    split = rng.randint(1, len(leaves) - 1)
    return (rng.choice(ops), _random_tree(rng, leaves[:split], ops), _random_tree(rng, leaves[split:], ops))


def _is_heldout(canonical: str) -> bool:
    digest = hashlib.sha256(f"dsv4-math:{canonical}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < _HELDOUT_PER_MILLE


def final_answer(turns: list[dict]) -> str | None:
    """What follows the last `Answer:` in the last assistant message's content (stripped), or None."""
    content = next((t.get("content") or "" for t in reversed(turns) if t.get("role") == "assistant"), "")
    found = re.findall(r"answer\s*:[ \t]*([^\n]*)", content, flags=re.IGNORECASE)
    return found[-1].strip().removesuffix(".").strip() if found else None


class MathEnv:
    """Arithmetic and countdown problems at a difficulty `level` ("easy", "medium", "hard" or a MathLevel);
    `kinds` restricts the level's problem kinds."""

    name = "math"
    max_turns = 1

    def __init__(self, level: str | MathLevel = "easy", kinds: tuple[str, ...] | None = None):
        if isinstance(level, str):
            if level not in LEVELS:
                raise InvalidArgument(f"math level {level!r} is not one of {sorted(LEVELS)}")
            level = LEVELS[level]
        if not isinstance(level, MathLevel):
            raise InvalidArgument(f"math level must be a name or a MathLevel, got {type(level).__name__}")
        kinds = tuple(kinds or level.kinds)
        if not kinds or any(k not in ("arith", "countdown") for k in kinds):
            raise InvalidArgument(f"math kinds {kinds!r}: each must be 'arith' or 'countdown'")
        self.level, self.kinds = level, kinds

    # -- problems ----------------------------------------------------------------------------------------------

    def sample(self, rng: random.Random) -> Problem:
        while True:
            problem = self._generate(rng)
            if not _is_heldout(problem.meta["canonical"]):
                return problem

    def heldout(self, n: int) -> list[Problem]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidArgument(f"heldout n must be a non-negative integer, got {n!r}")
        rng = random.Random(f"dsv4-math-heldout:{self.level.name}:{','.join(self.kinds)}")
        found: dict[str, Problem] = {}
        misses = 0                       # draws since the last new held-out problem: the level's set is exhausted
        while len(found) < n and misses < _EXHAUSTED_AFTER:
            problem = self._generate(rng)
            misses += 1
            if _is_heldout(problem.meta["canonical"]) and problem.id not in found:
                found[problem.id], misses = problem, 0
        if len(found) < n:
            raise InvalidArgument(f"math level {self.level.name!r} has only about {len(found)} held-out problems; "
                                  f"asked for {n}")
        return list(found.values())

    def _generate(self, rng: random.Random) -> Problem:
        kind = rng.choice(self.kinds)
        return self._arith(rng) if kind == "arith" else self._countdown(rng)

    def _arith(self, rng: random.Random) -> Problem:
        lv = self.level
        operands = [rng.randint(0, lv.max_operand) for _ in range(rng.randint(*lv.terms))]
        if lv.parentheses:
            text = render(_random_tree(rng, operands, lv.ops))
        else:
            text = str(operands[0]) + "".join(rng.choice(lv.ops) + str(x) for x in operands[1:])
        steps: list[str] = []
        value = evaluate(parse_expression(text), steps)
        prompt = f"{text}=?" if lv.short_prompt else \
            f"Compute {' '.join(re.findall(r'[0-9]+|.', text))}. End with 'Answer: <integer>'."
        canonical = f"arith:{text}"
        return Problem(domain=self.name, id=canonical, messages=[{"role": "user", "content": prompt}],
                       answer=value, meta={"kind": "arith", "level": lv.name, "canonical": canonical,
                                           "steps": steps})

    def _countdown(self, rng: random.Random) -> Problem:
        lv = self.level
        while True:
            numbers = [rng.randint(1, lv.countdown_max) for _ in range(lv.countdown_numbers)]
            tree = _random_tree(rng, numbers, lv.ops)
            target = evaluate(tree)
            if target > 0:
                break
        shown = sorted(numbers)
        listed = " ".join(map(str, shown))
        prompt = f"{listed} -> {target}" if lv.short_prompt else \
            (f"Use the numbers {listed} to make {target} with {' '.join(lv.ops)}, each number exactly once. "
             f"End with 'Answer: <expression>'.")
        canonical = f"countdown:{','.join(map(str, shown))}->{target}"
        return Problem(domain=self.name, id=canonical, messages=[{"role": "user", "content": prompt}],
                       answer={"numbers": shown, "target": target},
                       meta={"kind": "countdown", "level": lv.name, "canonical": canonical,
                             "solution": render(tree)})

    # -- solver and reward -------------------------------------------------------------------------------------

    def demonstrate(self, problem: Problem) -> list[dict]:
        if problem.meta["kind"] == "arith":
            steps, answer = problem.meta["steps"], str(problem.answer)
        else:
            steps, answer = [], problem.meta["solution"]
            evaluate(parse_expression(answer), steps)
        return [{"role": "assistant", "reasoning_content": "\n".join(steps), "content": f"Answer: {answer}"}]

    def tool_results(self, problem: Problem, tool_calls: list[dict]) -> list[dict]:
        return []

    def reward(self, problem: Problem, turns: list[dict]) -> Reward:
        answer = final_answer(turns)
        if answer is None:
            return Reward(0.0, False, {"error": "no 'Answer:' in the final message"})
        if problem.meta["kind"] == "arith":
            if not re.fullmatch(r"[+-]?\d{1,64}", answer):
                return Reward(0.0, False, {"error": f"answer {answer[:40]!r} is not an integer"})
            correct = int(answer) == problem.answer
            return Reward(float(correct), correct, {"answer": int(answer)})
        try:
            tree = parse_expression(answer)
        except ExpressionError as e:
            return Reward(0.0, False, {"error": f"answer is not an expression: {e}"})
        used, given = Counter(_leaves(tree)), Counter(problem.answer["numbers"])
        if used != given:
            return Reward(0.0, False, {"error": f"uses {sorted(used.elements())}, "
                                                f"must use each of {problem.answer['numbers']} once"})
        value = evaluate(tree)
        correct = value == problem.answer["target"]
        return Reward(float(correct), correct, {"value": value})
