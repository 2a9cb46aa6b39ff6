"""Environments by name, for the command line and the pipeline: `make_env("agent", level="easy")`, and the
command line's per-domain form `parse_env_levels("math,code:medium", "easy")`.

Each environment is imported only when asked for, so building one never imports the others (the code
environment's sandbox, for one, is not needed to run the instruction-following environment).
"""
from __future__ import annotations

import importlib

from ...errors import InvalidArgument
from .base import Environment
from .split import LEVELS

__all__ = ["ENV_NAMES", "make_env", "parse_env_levels"]

# name -> (module under dsv4.posttrain.envs, class); every class takes `level` plus its own keywords
_CLASSES = {
    "math": ("math", "MathEnv"),
    "code": ("code", "CodeEnv"),
    "instruct": ("instruct", "InstructEnv"),
    "agent": ("agent", "AgentEnv"),
    "rubric": ("rubric", "RubricEnv"),
}
ENV_NAMES = tuple(_CLASSES)


def make_env(name: str, level: str = "easy", **kw) -> Environment:
    """The environment `name` (one of ENV_NAMES) at difficulty `level` (one of LEVELS)."""
    if name not in _CLASSES:
        raise InvalidArgument(f"unknown environment {name!r}; expected one of {', '.join(ENV_NAMES)}")
    if level not in LEVELS:
        raise InvalidArgument(f"{name} environment: level={level!r} is not one of {LEVELS}")
    module_name, class_name = _CLASSES[name]
    full = f"{__package__}.{module_name}"
    try:
        module = importlib.import_module(full)
    except ModuleNotFoundError as e:
        if e.name != full:
            raise
        raise InvalidArgument(f"environment {name!r} is not available in this install: no module {full}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise InvalidArgument(f"environment {name!r}: {module.__name__} defines no {class_name}")
    return cls(level=level, **kw)


def parse_env_levels(spec: str, default_level: str = "easy") -> dict[str, str]:
    """`--env`'s "NAME[:LEVEL],..." -> {name: level} in the order given; a name without ":LEVEL" takes
    `default_level`. Refuses, naming the bad part: an empty spec or part, an unknown name or level, a name
    given twice."""
    if default_level not in LEVELS:
        raise InvalidArgument(f"--level {default_level!r}: not one of {', '.join(LEVELS)}")
    out: dict[str, str] = {}
    parts = [s.strip() for s in spec.split(",")]
    if not any(parts):
        raise InvalidArgument(f"--env {spec!r}: no environment; expected NAME[:LEVEL],... with NAME one of "
                              f"{', '.join(ENV_NAMES)}")
    for part in parts:
        name, colon, level = (s.strip() for s in part.partition(":"))
        if not name:
            raise InvalidArgument(f"--env {spec!r}: empty entry {part!r}; expected NAME[:LEVEL],...")
        if name not in _CLASSES:
            raise InvalidArgument(f"--env {spec!r}: unknown environment {name!r} in {part!r}; expected one of "
                                  f"{', '.join(ENV_NAMES)}")
        if colon and level not in LEVELS:
            raise InvalidArgument(f"--env {spec!r}: unknown level {level!r} in {part!r}; expected one of "
                                  f"{', '.join(LEVELS)}")
        if name in out:
            raise InvalidArgument(f"--env {spec!r}: environment {name!r} given twice ({part!r})")
        out[name] = level if colon else default_level
    return out
