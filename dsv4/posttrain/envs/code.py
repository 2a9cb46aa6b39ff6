"""Write a Python function from a description; the reward is the fraction of hidden unit tests it passes.

Problems come from small parameterised families ("x plus 3", "sum of the elements of xs divisible by 4",
"fizzbuzz with 3/'Fizz' and 5/'Buzz'", ...). Each problem's test inputs are drawn from a seed of its canonical
form, and the expected outputs come from the family's reference solution, run here (trusted code). The
model's code runs only in the sandbox: each reply runs every test under a harness that prints each call's
return value as JSON, in a process of its own, the replies of one rollout batch under one sandboxed supervisor
(`reward_batch`, sandbox_batch.py); the comparison with the expected values happens here, so the
expected outputs never enter the sandbox. A syntax error, a missing function, an exception, a per-test
timeout or a killed run fails the tests it touches.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ...errors import InvalidArgument
from ..sandbox import Limits, SandboxResult
from ..sandbox_batch import run_python_batch
from .base import Problem, Reward

__all__ = ["Family", "FAMILIES", "LEVELS", "CodeEnv", "extract_code"]

_EXHAUSTED_AFTER = 5000          # draws without a new held-out problem before heldout gives up
_HELDOUT_PER_MILLE = 200          # 20% of each level's problems are held out
_RESULT_PREFIX = "@@dsv4-result"


@dataclass(frozen=True)
class Family:
    name: str
    level: str                                          # "easy" | "medium" | "hard"
    signature: str                                      # "f(x)"
    params: Callable[[random.Random], dict]             # one draw of the family's parameters
    describe: Callable[[dict], str]                     # what the function must return
    solution: str                                       # the reference body, formatted with the parameters
    inputs: Callable[[random.Random, dict], list[list]]  # argument lists of the hidden tests


def _ints(rng: random.Random, p: dict) -> list[list]:
    return [[0]] + [[rng.randint(-20, 60)] for _ in range(5)]


def _naturals(rng: random.Random, p: dict) -> list[list]:
    return [[0]] + [[rng.randint(1, 100)] for _ in range(5)]


def _lists(rng: random.Random, p: dict) -> list[list]:
    return [[[]]] + [[[rng.randint(-10, 30) for _ in range(rng.randint(1, 8))]] for _ in range(5)]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 6)))


def _sentences(rng: random.Random, p: dict) -> list[list]:
    return [[""]] + [[" ".join(_word(rng) for _ in range(rng.randint(1, 5)))] for _ in range(5)]


def _distinct_pair(rng: random.Random, lo: int, hi: int) -> tuple[int, int]:
    a, b = rng.sample(range(lo, hi + 1), 2)
    return a, b


_WORDS = ("Fizz", "Buzz", "Ping", "Pong", "Foo", "Bar", "Zip", "Zap")

FAMILIES: tuple[Family, ...] = (
    # easy: one expression of one integer, short prompts
    Family("add", "easy", "f(x)", lambda r: {"k": r.randint(1, 30)}, lambda p: f"x plus {p['k']}",
           "return x + {k}", _ints),
    Family("sub", "easy", "f(x)", lambda r: {"k": r.randint(1, 30)}, lambda p: f"x minus {p['k']}",
           "return x - {k}", _ints),
    Family("mul", "easy", "f(x)", lambda r: {"k": r.randint(2, 30)}, lambda p: f"x times {p['k']}",
           "return x * {k}", _ints),
    Family("mod", "easy", "f(x)", lambda r: {"k": r.randint(2, 30)}, lambda p: f"x modulo {p['k']}",
           "return x % {k}", _naturals),
    Family("max", "easy", "f(x)", lambda r: {"k": r.randint(0, 30)}, lambda p: f"the larger of x and {p['k']}",
           "return max(x, {k})", _ints),
    Family("divisible", "easy", "f(x)", lambda r: {"k": r.randint(2, 30)},
           lambda p: f"whether x is divisible by {p['k']}", "return x % {k} == 0", _naturals),
    # medium: a loop or comprehension over a list or a string
    Family("sum_divisible", "medium", "solve(xs)", lambda r: {"k": r.randint(2, 9)},
           lambda p: f"the sum of the numbers in the list xs that are divisible by {p['k']}",
           "return sum(x for x in xs if x % {k} == 0)", _lists),
    Family("count_greater", "medium", "solve(xs)", lambda r: {"k": r.randint(-5, 20)},
           lambda p: f"how many numbers in the list xs are greater than {p['k']}",
           "return sum(1 for x in xs if x > {k})", _lists),
    Family("between", "medium", "solve(xs)", lambda r: dict(zip("ab", sorted(_distinct_pair(r, -5, 25)))),
           lambda p: f"the list of the numbers in xs from {p['a']} to {p['b']} inclusive, in their order",
           "return [x for x in xs if {a} <= x <= {b}]", _lists),
    Family("reverse_words", "medium", "solve(s)", lambda r: {"k": r.randint(1, 5)},
           lambda p: f"s (words separated by single spaces) with every word of at least {p['k']} letters "
                     f"reversed",
           "return ' '.join(w[::-1] if len(w) >= {k} else w for w in s.split(' '))", _sentences),
    Family("count_letters", "medium", "solve(s)",
           lambda r: {"letters": "".join(sorted(r.sample("abcdefghijklmnopqrstuvwxyz", r.randint(2, 5))))},
           lambda p: f"how many characters of s are one of the letters {p['letters']!r}",
           "return sum(1 for c in s if c in {letters!r})", _sentences),
    Family("repeat_chars", "medium", "solve(s)", lambda r: {"k": r.randint(2, 4)},
           lambda p: f"s with every character repeated {p['k']} times", "return ''.join(c * {k} for c in s)",
           _sentences),
    # hard: several cases or a small algorithm
    Family("fizzbuzz", "hard", "solve(n)",
           lambda r: dict(zip(("a", "b"), _distinct_pair(r, 2, 7)), **dict(zip(("u", "v"), r.sample(_WORDS, 2)))),
           lambda p: (f"the list of strings for 1..n: {p['u']!r} for multiples of {p['a']}, {p['v']!r} for "
                      f"multiples of {p['b']}, {p['u'] + p['v']!r} for multiples of both, else the number"),
           "return [{u!r} * (i % {a} == 0) + {v!r} * (i % {b} == 0) or str(i) for i in range(1, n + 1)]",
           lambda r, p: [[0], [1]] + [[r.randint(2, 40)] for _ in range(4)]),
    Family("caesar", "hard", "solve(s)", lambda r: {"k": r.randint(1, 25)},
           lambda p: f"s with each lowercase letter shifted {p['k']} places forward in the alphabet, wrapping "
                     f"from z to a; other characters unchanged",
           "return ''.join(chr((ord(c) - 97 + {k}) % 26 + 97) if 'a' <= c <= 'z' else c for c in s)",
           _sentences),
    Family("run_length", "hard", "solve(s)", lambda r: {"count_first": r.random() < 0.5},
           lambda p: ("the run-length encoding of s: each run of a repeated character as "
                      + ("its length then the character" if p["count_first"] else "the character then its length")
                      + ", e.g. 'aaab' -> " + ("'3a1b'" if p["count_first"] else "'a3b1'")),
           "out = []\nfor c in s:\n    if out and out[-1][0] == c:\n        out[-1][1] += 1\n    else:\n"
           "        out.append([c, 1])\nreturn ''.join({pair} for c, k in out)",
           lambda r, p: [[""]] + [["".join(r.choice("abc") * r.randint(1, 4) for _ in range(r.randint(1, 5)))]
                                  for _ in range(5)]),
    Family("digit_powers", "hard", "solve(n)", lambda r: {"k": r.randint(1, 4)},
           lambda p: f"the sum of the {p['k']}-th powers of the decimal digits of the non-negative integer n",
           "return sum(int(d) ** {k} for d in str(n))", lambda r, p: [[0]] + [[r.randint(1, 99999)] for _ in range(5)]),
)

LEVELS = ("easy", "medium", "hard")


def _format(family: Family, params: dict) -> str:
    values = dict(params)
    if family.name == "run_length":
        values["pair"] = "str(k) + c" if params["count_first"] else "c + str(k)"
    body = family.solution.format(**values)
    return f"def {family.signature}:\n" + "\n".join("    " + line for line in body.splitlines())


def _is_heldout(canonical: str) -> bool:
    digest = hashlib.sha256(f"dsv4-code:{canonical}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < _HELDOUT_PER_MILLE


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def extract_code(text: str) -> str | None:
    """The last fenced code block (```python or plain ```) of `text`, or None."""
    blocks = re.findall(r"```(?:python|py)?[ \t]*\n(.*?)```", text, flags=re.DOTALL)
    return blocks[-1] if blocks else None


# The harness the sandbox runs: reads {nonce, entry, inputs, per_test_s} on stdin, defines the model's code,
# calls the entry point on each input and prints one result line per test; the model's own prints go nowhere.
# The first test that runs out of time ends the run (a loop on one input usually loops on all).
_HARNESS = r'''
import json, signal, sys
_spec = json.loads(sys.stdin.read())
_real_stdout = sys.stdout

class _Sink:
    def write(self, text): return len(text)
    def flush(self): pass

class _TestTimeout(BaseException):
    pass

def _on_alarm(signum, frame):
    raise _TestTimeout()

def _report(i, **fields):
    _real_stdout.write(_spec["prefix"] + " " + _spec["nonce"] + " " + json.dumps(dict(i=i, **fields)) + "\n")
    _real_stdout.flush()

signal.signal(signal.SIGALRM, _on_alarm)
sys.stdout = _Sink()
_scope = {"__name__": "solution"}
try:
    exec(compile(_SOURCE, "solution.py", "exec"), _scope)
    _entry = _scope[_spec["entry"]]
except BaseException as e:
    _report(-1, error=type(e).__name__)
    raise SystemExit(0)
for _i, _args in enumerate(_spec["inputs"]):
    signal.setitimer(signal.ITIMER_REAL, _spec["per_test_s"])
    try:
        _value = _entry(*_args)
        signal.setitimer(signal.ITIMER_REAL, 0)
        _report(_i, value=_value)
    except BaseException as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _report(_i, error=type(e).__name__)
        if isinstance(e, _TestTimeout):
            break
'''


class CodeEnv:
    """Python-function problems at a difficulty `level` ("easy", "medium", "hard"); `families` restricts the
    level's families by name; `limits` bounds each reward call's sandbox run."""

    name = "code"
    max_turns = 1

    def __init__(self, level: str = "easy", families: tuple[str, ...] | None = None, *,
                 limits: Limits | None = None, per_test_s: float = 0.25):
        if level not in LEVELS:
            raise InvalidArgument(f"code level {level!r} is not one of {list(LEVELS)}")
        available = {f.name: f for f in FAMILIES if f.level == level}
        chosen = tuple(families or available)
        unknown = [name for name in chosen if name not in available]
        if unknown or not chosen:
            raise InvalidArgument(f"code families {unknown or chosen!r} are not among level {level!r}'s "
                                  f"{sorted(available)}")
        if not per_test_s > 0:
            raise InvalidArgument(f"code per_test_s must be positive, got {per_test_s!r}")
        self.level, self.families = level, tuple(available[name] for name in chosen)
        self.limits = limits or Limits(timeout_s=2.0, cpu_s=2)
        self.per_test_s = per_test_s

    # -- problems ----------------------------------------------------------------------------------------------

    def sample(self, rng: random.Random) -> Problem:
        while True:
            problem = self._generate(rng)
            if not _is_heldout(problem.id):
                return problem

    def heldout(self, n: int) -> list[Problem]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidArgument(f"heldout n must be a non-negative integer, got {n!r}")
        rng = random.Random(f"dsv4-code-heldout:{self.level}:{','.join(f.name for f in self.families)}")
        found: dict[str, Problem] = {}
        misses = 0                       # draws since the last new held-out problem: the level's set is exhausted
        while len(found) < n and misses < _EXHAUSTED_AFTER:
            problem = self._generate(rng)
            misses += 1
            if _is_heldout(problem.id) and problem.id not in found:
                found[problem.id], misses = problem, 0
        if len(found) < n:
            raise InvalidArgument(f"code level {self.level!r} has only about {len(found)} held-out problems; "
                                  f"asked for {n}")
        return list(found.values())

    def _generate(self, rng: random.Random) -> Problem:
        family = rng.choice(self.families)
        params = family.params(rng)
        canonical = f"{family.name}:" + ",".join(f"{k}={params[k]!r}" for k in sorted(params))
        solution = _format(family, params)
        inputs = family.inputs(random.Random(f"dsv4-code-tests:{canonical}"), params)
        scope: dict = {}
        exec(compile(solution, f"<reference {canonical}>", "exec"), scope)   # our reference, not model output
        entry = family.signature.split("(")[0]
        expected = [_canonical_json(scope[entry](*args)) for args in inputs]
        task = f"Write {family.signature} returning {family.describe(params)}."
        prompt = task if self.level == "easy" else f"{task} Reply with the function in a ```python block."
        return Problem(domain=self.name, id=canonical, messages=[{"role": "user", "content": prompt}],
                       answer={"entry": entry, "inputs": inputs, "expected": expected},
                       meta={"family": family.name, "level": self.level, "params": params, "solution": solution})

    # -- solver and reward -------------------------------------------------------------------------------------

    def demonstrate(self, problem: Problem) -> list[dict]:
        return [{"role": "assistant", "reasoning_content": "",
                 "content": f"```python\n{problem.meta['solution']}\n```"}]

    def tool_results(self, problem: Problem, tool_calls: list[dict]) -> list[dict]:
        return []

    def reward(self, problem: Problem, turns: list[dict]) -> Reward:
        return self.reward_batch([(problem, turns)])[0]

    def reward_batch(self, items: Sequence[tuple[Problem, list[dict]]]) -> list[Reward]:
        """Rewards of many replies, their tests run in one sandboxed process (sandbox_batch.py), each reply in
        a process of its own: what one reply does (loop, crash, flood) costs only its own reward."""
        out: list[Reward | None] = [None] * len(items)
        runs: list[tuple[int, str, dict]] = []               # (item, nonce, spec) of the replies with code
        for k, (problem, turns) in enumerate(items):
            content = next((t.get("content") or "" for t in reversed(turns) if t.get("role") == "assistant"), "")
            source = extract_code(content)
            if source is None:
                out[k] = Reward(0.0, False, {"error": "no ```python block in the final message", "passed": 0,
                                             "total": len(problem.answer["inputs"])})
                continue
            nonce = secrets.token_hex(8)
            spec = {"nonce": nonce, "prefix": _RESULT_PREFIX, "entry": problem.answer["entry"],
                    "inputs": problem.answer["inputs"], "per_test_s": self.per_test_s}
            runs.append((k, f"_SOURCE = {source!r}\n" + _HARNESS, {"nonce": nonce, "stdin": json.dumps(spec)}))
        results = run_python_batch([(code, extra["stdin"]) for _, code, extra in runs], limits=self.limits)
        for (k, _, extra), result in zip(runs, results):
            problem = items[k][0]
            total = len(problem.answer["inputs"])
            passed, info = _score(problem, result, extra["nonce"])
            out[k] = Reward(passed / total, passed == total, {"passed": passed, "total": total, **info})
        return out  # type: ignore[return-value]


def _score(problem: Problem, result: SandboxResult, nonce: str) -> tuple[int, dict]:
    """Tests passed by one sandboxed run of the harness, and why the others failed."""
    values: dict[int, str] = {}
    errors: dict[int, str] = {}
    lead = f"{_RESULT_PREFIX} {nonce} "
    for line in result.stdout.splitlines():
        if not line.startswith(lead):
            continue
        try:
            report = json.loads(line[len(lead):])
            i = int(report["i"])
        except (ValueError, KeyError, TypeError):
            continue
        if i in values or i in errors:
            continue                         # the first report of a test counts
        if "value" in report:
            values[i] = _canonical_json(report["value"])
        else:
            errors[i] = str(report.get("error"))
    passed = sum(values.get(i) == want for i, want in enumerate(problem.answer["expected"]))
    info: dict = {"errors": sorted(set(errors.values()))}
    if result.killed_reason:
        info["killed"] = result.killed_reason
    if -1 in errors:
        info["load_error"] = errors[-1]
    return passed, info
