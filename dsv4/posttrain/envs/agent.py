"""Multi-turn tool use in the V4 tool-call format: questions the model answers by calling a `calculator` and a
key-value `search` over a table of made-up city facts, then replying with the number.

Each problem carries its own fact table (drawn from a seed stored in the hidden answer), so facts cannot be
memorised from training problems: the search tool is the only way to them. A rollout alternates assistant
turns and the `tool` messages `tool_results` returns; a bad tool name or bad arguments come back as an
"error: ..." tool result, never as an exception, so the model can see its mistake and retry within `max_turns`.

Levels: `easy` needs one call (one arithmetic step or one lookup); `medium` two lookups combined by the
calculator, or a two-operator expression; `hard` up to three lookups, or a three-operator expression.
"""
from __future__ import annotations

import copy
import json
import random
import re
from functools import lru_cache
from typing import Any

from .base import Problem, Reward
from .calculator import CalculatorError, calculate, format_number
from .split import HashSplit, check_level, final_assistant, problem_id

__all__ = ["AgentEnv", "TOOLS", "SYSTEM_PROMPT", "fact_table", "run_tool"]

TOOLS = [
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression with + - * / and parentheses.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Look up a fact, e.g. 'population of Varnel'.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
]
SYSTEM_PROMPT = "Use the tools to find the answer, then reply with the number only."
_PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

_PREFIXES = ("Var", "Quo", "Bel", "Tor", "Mir", "Zan", "Kel", "Dor", "Fen", "Lum", "Sar", "Ost", "Pra", "Vel",
             "Nor", "Gal")
_SUFFIXES = ("nel", "rra", "mont", "ith", "avo", "dun", "wick", "ora", "esk", "ham")
# attribute -> (question, range of values)
ATTRIBUTES = {
    "population": ("What is the population of {c}?", (1200, 98000)),
    "founding year": ("In what year was {c} founded?", (1100, 1980)),
    "area": ("What is the area of {c} in square kilometres?", (12, 950)),
    "altitude": ("What is the altitude of {c} in metres?", (5, 2400)),
}
CITIES_PER_TABLE = 6
MAX_TURNS = {"easy": 3, "medium": 4, "hard": 5}


@lru_cache(maxsize=4096)
def fact_table(seed: int) -> dict[str, int]:
    """The facts of one problem: normalised key ('population of varnel') -> value."""
    rng = random.Random(f"agent-world-{seed}")
    names = rng.sample([p + s for p in _PREFIXES for s in _SUFFIXES], CITIES_PER_TABLE)
    return {_normalise(f"{attr} of {city}"): rng.randint(*span)
            for city in names for attr, (_, span) in ATTRIBUTES.items()}


def _cities(seed: int) -> list[str]:
    keys = fact_table(seed)
    return sorted({k.split(" of ", 1)[1].capitalize() for k in keys})


def _normalise(query: str) -> str:
    words = re.sub(r"[^a-z0-9 ]+", " ", query.lower()).split()
    return " ".join(words[1:] if words[:1] == ["the"] else words)


def _search(seed: int, query: str) -> str:
    table, key = fact_table(seed), _normalise(query)
    if key not in table:   # also accept '<city> <attribute>'
        for attr in ATTRIBUTES:
            if key.endswith(" " + attr):
                key = f"{attr} of {key[:-len(attr) - 1]}"
                break
    if key in table:
        return f"{key}: {table[key]}"
    return f"no result for {query!r}; ask for '<attribute> of <city>' with attribute one of {', '.join(ATTRIBUTES)}"


def _arguments(name: str, raw: Any) -> dict:
    """The call's arguments checked against the tool's schema; ValueError names what is wrong."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except ValueError as e:
            raise ValueError(f"arguments are not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"arguments must be a JSON object, got {type(raw).__name__}")
    raw, params = dict(raw), _PARAMS[name]
    unknown = sorted(set(raw) - set(params["properties"]))
    missing = [p for p in params["required"] if p not in raw]
    if unknown or missing:
        raise ValueError(f"{name} takes {sorted(params['properties'])}; "
                         + (f"unknown {unknown}" if unknown else f"missing {missing}"))
    for key, value in raw.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raw[key] = str(value)   # a number where a string is expected is still a usable expression
        elif not isinstance(value, str):
            raise ValueError(f"{name}: {key} must be a string, got {type(value).__name__}")
    return raw


def run_tool(seed: int, call: Any) -> str:
    """The result text of one OpenAI-shaped tool call against fact table `seed`; problems become 'error: ...'."""
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if name not in _PARAMS:
        return f"error: unknown tool {name!r}; available tools: {', '.join(_PARAMS)}"
    try:
        args = _arguments(name, function.get("arguments", "{}"))
        if name == "calculator":
            return format_number(calculate(args["expression"]))
        return _search(seed, args["query"])
    except (ValueError, CalculatorError) as e:
        return f"error: {e}"


def _call(i: int, name: str, **arguments: str) -> dict:
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_answer(text: str) -> float | None:
    """The last number in a reply ('1,234' reads as 1234), or None when it has none."""
    numbers = _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3})", "", text))
    return float(numbers[-1]) if numbers else None


class AgentEnv(HashSplit):
    """Tool-use questions with an integer answer. `answer` = {"value", "seed", "plan"}: the plan is the list of
    tool-call turns a correct solver makes (each a list of (tool, argument) pairs)."""
    name = "agent"

    def __init__(self, level: str = "easy"):
        self.level = check_level(self.name, level)
        self.max_turns = MAX_TURNS[level]

    # ------------------------------------------------------------------ problems
    def _make(self, rng: random.Random) -> tuple[str, Problem]:
        seed = rng.getrandbits(32)
        steps = {"easy": 1, "medium": 2, "hard": 3}[self.level]
        if rng.random() < 0.5:
            question, value, plan = self._arithmetic(rng, steps)
        else:
            question, value, plan = self._lookup(rng, seed, steps)
        messages = [{"role": "system", "content": SYSTEM_PROMPT, "tools": copy.deepcopy(TOOLS)},
                    {"role": "user", "content": question}]
        # the key holds the facts a lookup reads, so equal questions over different tables stay distinct
        key = question if plan[0][0][0] == "calculator" else f"{question}|{seed}"
        return key, Problem(self.name, problem_id(self.name, self.level, key), messages,
                            {"value": value, "seed": seed, "plan": plan}, {"level": self.level})

    @staticmethod
    def _arithmetic(rng: random.Random, ops: int) -> tuple[str, int, list]:
        expr = str(rng.randint(10, 99))
        for i in range(ops):
            op, x = rng.choice("+-*"), rng.randint(2 if i else 10, 99)
            expr = f"({expr}) {op} {x}" if i and op == "*" else f"{expr} {op} {x}"
        value = calculate(expr)
        return f"What is {expr}?", int(value), [[["calculator", expr]]]

    @staticmethod
    def _lookup(rng: random.Random, seed: int, n: int) -> tuple[str, int, list]:
        table, cities = fact_table(seed), _cities(seed)
        if n == 1:
            city, attr = rng.choice(cities), rng.choice(sorted(ATTRIBUTES))
            key = f"{attr} of {city}"
            return ATTRIBUTES[attr][0].format(c=city), table[_normalise(key)], [[["search", key]]]
        attr = rng.choice(("population", "area", "altitude"))
        chosen = rng.sample(cities, n)
        keys = [f"{attr} of {c}" for c in chosen]
        values = [table[_normalise(k)] for k in keys]
        expr = " + ".join(map(str, values))
        names = ", ".join(chosen[:-1]) + f" and {chosen[-1]}"
        question = f"What is the total {attr} of {names}?"
        return question, sum(values), [[["search", k] for k in keys], [["calculator", expr]]]

    # ------------------------------------------------------------------ the Environment protocol
    def demonstrate(self, problem: Problem) -> list[dict]:
        """The solving transcript: each planned turn of tool calls, their tool messages, then the number."""
        out, n = [], 0
        for turn in problem.answer["plan"]:
            calls = []
            for tool, argument in turn:
                calls.append(_call(n, tool, **{"expression" if tool == "calculator" else "query": argument}))
                n += 1
            out.append({"role": "assistant", "content": "", "tool_calls": calls})
            out += self.tool_results(problem, calls)
        out.append({"role": "assistant", "content": str(problem.answer["value"])})
        return out

    def tool_results(self, problem: Problem, tool_calls: list[dict]) -> list[dict]:
        seed = problem.answer["seed"]
        return [{"role": "tool", "tool_call_id": (c.get("id") if isinstance(c, dict) else None) or f"call_{i}",
                 "content": run_tool(seed, c)} for i, c in enumerate(tool_calls or ())]

    def reward(self, problem: Problem, turns: list[dict]) -> Reward:
        calls = sum(len(t.get("tool_calls") or ()) for t in turns if t.get("role") == "assistant")
        errors = sum(str(t.get("content", "")).startswith("error:") for t in turns if t.get("role") == "tool")
        info = {"tool_calls": calls, "tool_errors": errors,
                "assistant_turns": sum(t.get("role") == "assistant" for t in turns)}
        final = final_assistant(turns)
        if final is None:
            return Reward(0.0, False, {**info, "error": "no final answer (the last turn is not a plain reply)"})
        parsed = parse_answer(final.get("content") or "")
        if parsed is None:
            return Reward(0.0, False, {**info, "error": "the final answer has no number"})
        ok = parsed == problem.answer["value"]
        return Reward(float(ok), ok, {**info, "parsed": parsed, "expected": problem.answer["value"]})
