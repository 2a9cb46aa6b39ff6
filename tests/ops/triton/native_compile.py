"""Compile, for real GPUs (sm_90: H100/H200; sm_80: A100), every Triton kernel launch an interpreted check made,
on a machine without a GPU. The interpreter runs kernels as Python and accepts code that the compiler rejects
(a compiled `if` may not change a value's shape, say); such a kernel passes every CPU check and then fails to
build on the GPU.

`recording(launches)` (in the interpreted process) collects each distinct launch's kernel, argument types and
constexpr values; `failures(launches, pool)` (in a process without TRITON_INTERPRET) compiles each for every target
and returns the errors per target. `python native_compile.py` is such a process: it answers lists of launches on
stdin with their failures on stdout, one JSON line each, until stdin closes."""
from __future__ import annotations

import importlib
import inspect
import json
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import Iterator

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
POINTEE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "int8": "i8", "uint8": "u8",
           "int16": "i16", "int32": "i32", "int64": "i64", "bool": "i1", "float8_e4m3fn": "fp8e4nv"}


def _arg_type(value) -> str | None:
    """Triton's signature type of a runtime argument (None: not one this check handles)."""
    import torch
    if isinstance(value, torch.Tensor):
        return "*" + POINTEE[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    return None


def describe(fn, args: tuple, kwargs: dict) -> dict:
    """A launch as JSON: module, kernel name, {param: type or "constexpr"}, constexprs, launch options (or what
    this check cannot describe, as "unsupported")."""
    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args)) | {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
    signature, constexprs = {}, {}
    for name, p in params.items():
        value = bound.get(name, p.default)
        if "constexpr" in str(p.annotation) or value is None:
            if not (value is None or isinstance(value, (bool, int, float, str))):
                return {"kernel": fn.__name__, "module": fn.__module__, "unsupported": f"constexpr {name}={value!r}"}
            signature[name], constexprs[name] = "constexpr", value
        elif (kind := _arg_type(value)) is None:
            return {"kernel": fn.__name__, "module": fn.__module__, "unsupported": f"argument {name}: {type(value)}"}
        else:
            signature[name] = kind
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": options}


@contextmanager
def recording(launches: dict[str, dict]) -> Iterator[None]:
    """Inside the block, every interpreted kernel launch of this process is added to `launches` (once per kind,
    keyed by its JSON)."""
    from triton.runtime.interpreter import InterpretedFunction
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        launch = describe(self.fn, args, kwargs)
        launches.setdefault(json.dumps(launch, sort_keys=True), launch)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)
    InterpretedFunction.run = recording_run
    try:
        yield
    finally:
        InterpretedFunction.run = run


TARGETS = {"sm_90": 90, "sm_80": 80}


def compile_error(launch: dict, capability: int) -> dict | None:
    """Compile one recorded launch for one GPU capability: None, or the failure as {kernel, constexprs, error}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    where = {"kernel": f"{launch['module']}.{launch['kernel']}", "constexprs": launch.get("constexprs", {})}
    if "unsupported" in launch:
        return where | {"error": f"not checked: {launch['unsupported']}"}
    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    try:
        triton.compile(ASTSource(fn, launch["signature"], launch["constexprs"]),
                       target=GPUTarget("cuda", capability, 32), options=launch["options"])
    except Exception as e:  # noqa: BLE001 - every kernel's error is reported, not the first only
        return where | {"error": f"{type(e).__name__}: {str(e).strip()[-600:]}"}
    return None


def failures(launches: list[dict], pool: Executor, targets: dict[str, int] = TARGETS) -> dict[str, list[dict]]:
    """Every launch compiled for every target on the pool's processes: each target's failures."""
    jobs = [(name, launch, cap) for name, cap in targets.items() for launch in launches]
    errors = list(pool.map(compile_error, [j[1] for j in jobs], [j[2] for j in jobs]))
    return {name: [e for (n, _, _), e in zip(jobs, errors) if n == name and e] for name in targets}


def serve() -> None:
    """Answer requests until stdin closes: each line a JSON list of launches, each answer a line of JSON with the
    failures per target. One process serves a whole test session (torch and Triton are imported once)."""
    import os
    import sys
    from concurrent.futures import ProcessPoolExecutor
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the compiler or a worker prints goes to stderr, never into an answer
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for line in sys.stdin:
            print(json.dumps(failures(json.loads(line), pool)), file=answers, flush=True)


if __name__ == "__main__":
    serve()
