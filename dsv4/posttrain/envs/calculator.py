"""A calculator for model-written expressions: numbers, + - * /, unary signs and parentheses, evaluated exactly
with fractions by a recursive-descent parser. Model output is never handed to `eval`; length and nesting are
bounded so no input can exhaust memory or the stack."""
from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["CalculatorError", "calculate", "format_number", "MAX_LENGTH", "MAX_DEPTH"]

MAX_LENGTH = 200     # characters of one expression
MAX_DEPTH = 32       # nesting of parentheses and unary signs
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?|\.\d+)|(\S))")


class CalculatorError(ValueError):
    """The expression cannot be evaluated; the message says why (shown to the model as the tool result)."""


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:   # only trailing whitespace is left
            break
        number, op = m.groups()
        if op is not None and op not in "+-*/()":
            raise CalculatorError(f"unexpected character {op!r}; use numbers, + - * / and parentheses")
        out.append(number if number is not None else op)
        pos = m.end()
    return out


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens, self.pos, self.depth = tokens, 0, 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str | None:
        tok = self.peek()
        self.pos += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            if self.take() == "*":
                value *= self.factor()
            else:
                divisor = self.factor()
                if divisor == 0:
                    raise CalculatorError("division by zero")
                value /= divisor
        return value

    def factor(self) -> Fraction:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CalculatorError(f"expression nested deeper than {MAX_DEPTH} levels")
        tok = self.take()
        if tok in ("+", "-"):
            value = self.factor() if tok == "+" else -self.factor()
        elif tok == "(":
            value = self.expr()
            if self.take() != ")":
                raise CalculatorError("missing ')'")
        elif tok is None:
            raise CalculatorError("expression ends too early")
        elif tok in "*/)":
            raise CalculatorError(f"unexpected {tok!r}")
        else:
            value = Fraction(tok)
        self.depth -= 1
        return value


def calculate(expression: str) -> Fraction:
    """The exact value of `expression`; CalculatorError for anything it cannot evaluate."""
    if not isinstance(expression, str):
        raise CalculatorError(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_LENGTH:
        raise CalculatorError(f"expression longer than {MAX_LENGTH} characters")
    tokens = _tokens(expression)
    if not tokens:
        raise CalculatorError("empty expression")
    parser = _Parser(tokens)
    value = parser.expr()
    if parser.peek() is not None:
        raise CalculatorError(f"unexpected {parser.peek()!r} after a complete expression")
    return value


def format_number(value: Fraction) -> str:
    """An integer as digits; anything else as a decimal rounded to 6 places, without trailing zeros."""
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text
