"""Launching tests/distributed/workers.py under torchrun, one case per launch or several cases of one world size in
one launch. Start-up (every rank importing torch and dsv4, then joining gloo) is much of a small case's time, so a
test module's cases of the same world size share one launch (`shared_launch`), and each test asserts on its own
case's results."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

WORKERS = os.path.join(os.path.dirname(__file__), "workers.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result_files(case: str, out, n: int) -> list[str]:
    return [os.path.join(out, f"{case}-rank{i}.pt") for i in range(n)]


def _launch(args: list[str], n: int, expected: list[str]) -> subprocess.CompletedProcess:
    """torchrun of workers.py with `args` on n ranks; `expected`: every result file the launch writes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), WORKERS, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    for _ in range(2):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        # one retry for a gloo teardown abort seen in ~1 of 10 runs (2 cores, under pytest; older code too):
        # every rank wrote its result and passed the final barrier, then a thread still joinable at exit
        # aborted a worker. Any other failure fails at once.
        teardown_abort = ("terminate called without an active exception" in r.stderr
                          and all(os.path.isfile(f) for f in expected))
        if r.returncode == 0 or not teardown_abort:
            break
    return r


def torchrun(case: str, n: int, out) -> list[dict]:
    """One case on n ranks: each rank's result."""
    results = _result_files(case, out, n)
    r = _launch([case, str(out)], n, results)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return [torch.load(f, weights_only=False) for f in results]


def torchrun_batch(cases: dict[str, tuple[str, Path]], n: int, listing: Path) -> dict[str, list[dict] | str]:
    """Several cases ({name: (worker case, its OUT directory)}) in one launch on n ranks, in order. Per name: each
    rank's result, or why there is none. A case that wrote every rank's result passes only if the launch succeeded
    or a later case is the one that failed (then the failure is that case's)."""
    listing.write_text(json.dumps([[case, str(out)] for case, out in cases.values()]))
    files = {name: _result_files(case, out, n) for name, (case, out) in cases.items()}
    r = _launch(["--batch", str(listing)], n, [f for fs in files.values() for f in fs])
    complete = {name: all(os.path.isfile(f) for f in fs) for name, fs in files.items()}
    names = list(cases)
    outcome: dict[str, list[dict] | str] = {}
    for i, name in enumerate(names):
        later_failed = not all(complete[m] for m in names[i + 1:])
        if complete[name] and (r.returncode == 0 or later_failed):
            outcome[name] = [torch.load(f, weights_only=False) for f in files[name]]
        else:
            outcome[name] = (f"{name} (worker case {cases[name][0]!r}, {n} ranks, launched with {names}): "
                             f"launch exit {r.returncode}, {'all' if complete[name] else 'not all'} of its results "
                             f"written\n" + r.stdout[-2000:] + r.stderr[-4000:])
    return outcome


# per test node name: (ranks, worker case, prepare(out): writes the case's inputs into its OUT directory)
SharedCases = dict[str, tuple[int, str, Callable[[Path], None]]]


def shared_launch(request, tmp_path_factory, cases: SharedCases) -> dict[str, tuple[Path, list[dict] | str]]:
    """The cases of the module's selected tests (after -k and -m), one launch per world size: per test node name,
    its OUT directory and its outcome (as torchrun_batch)."""
    selected = [item.name for item in request.session.items
                if item.module is request.module and item.name in cases]
    outs: dict[str, Path] = {}
    for name in selected:
        outs[name] = tmp_path_factory.mktemp(name.replace("[", "_").replace("]", ""))
        cases[name][2](outs[name])
    outcomes: dict[str, tuple[Path, list[dict] | str]] = {}
    for n in sorted({cases[name][0] for name in selected}):
        group = {name: (cases[name][1], outs[name]) for name in selected if cases[name][0] == n}
        listing = tmp_path_factory.mktemp(f"launch{n}") / "cases.json"
        for name, res in torchrun_batch(group, n, listing).items():
            outcomes[name] = (outs[name], res)
    return outcomes


def case_results(launched: dict[str, tuple[Path, list[dict] | str]], request) -> tuple[Path, list[dict]]:
    """This test's OUT directory and each rank's result from the shared launch; fails with the case's message."""
    out, res = launched[request.node.name]
    if isinstance(res, str):
        pytest.fail(res, pytrace=False)
    return out, res
