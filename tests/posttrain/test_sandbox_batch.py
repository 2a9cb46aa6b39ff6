"""Many scripts in one sandboxed process: each script that breaks a limit (loops, forks, floods its output,
crashes, signals the supervisor) fails alone, and the well-behaved scripts beside it still get their own output."""
from __future__ import annotations

import glob
import os
import tempfile

import pytest

from dsv4.errors import InvalidArgument
from dsv4.posttrain import sandbox_batch
from dsv4.posttrain.sandbox import Limits, run_python
from dsv4.posttrain.sandbox_batch import run_python_batch
from test_sandbox import FORK_BOMB, _assert_nothing_left, mode  # noqa: F401  (the isolation modes fixture)

GOOD = "import sys\nprint(sys.stdin.read().upper())"
BAD = {
    "busy loop": "while True:\n    pass",
    "sleeps": "import time\nprint('start', flush=True)\ntime.sleep(60)",
    "fork bomb": FORK_BOMB,
    "huge print": "while True:\n    print('x' * 1000)",
    "crash": "import os\nos.abort()",
    "segfault": "import faulthandler\nfaulthandler._sigsegv()",
    "kills the supervisor": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('alive')",
    "kills its group": "import os, signal\nos.killpg(0, signal.SIGKILL)",
    "exits 3": "raise SystemExit(3)",
    "memory hog": "x = bytearray(1 << 30)\nprint('allocated')",
}
LIMITS = Limits(timeout_s=1.5, cpu_s=1, memory_mb=128, output_bytes=10_000)


def _batch_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "dsv4-sandbox-batch-*")))


def test_each_bad_script_fails_alone_among_good_ones(mode):
    kinds = list(BAD)
    jobs, where = [], {}
    for k, kind in enumerate(kinds):                 # a good script before and after each bad one
        jobs.append((GOOD, f"good {k}"))
        where[kind] = len(jobs)
        jobs.append((BAD[kind], ""))
    jobs.append((GOOD, "last"))
    before = _batch_dirs()
    results = run_python_batch(jobs, limits=LIMITS, mode=mode, parallel=4)
    assert len(results) == len(jobs)
    bad = set(where.values())
    for i, ((_, stdin), r) in enumerate(zip(jobs, results)):
        if i not in bad:
            assert r.ok and r.stdout == stdin.upper() + "\n", (i, r)
    got = {kind: results[i] for kind, i in where.items()}
    assert got["busy loop"].killed_reason in ("cpu_limit", "timeout") and not got["busy loop"].ok
    assert got["sleeps"].killed_reason == "timeout" and got["sleeps"].stdout == "start\n"
    assert got["fork bomb"].stdout == "0\n"          # a batch script starts no process
    assert got["huge print"].killed_reason == "output_limit" and len(got["huge print"].stdout) == 10_000
    assert got["crash"].killed_reason == "signal SIGABRT"
    assert got["segfault"].killed_reason == "signal SIGSEGV"
    for kind in ("kills the supervisor", "kills its group"):
        assert got[kind].returncode == 1 and "PermissionError" in got[kind].stderr, got[kind]
        assert "alive" not in got[kind].stdout
    assert got["exits 3"].returncode == 3 and not got["exits 3"].ok
    assert got["memory hog"].returncode == 1 and "MemoryError" in got["memory hog"].stderr
    assert max(r.wall_s for r in results) < 3.0
    _assert_nothing_left(results[0])
    assert _batch_dirs() == before                   # the batch directory is gone


def test_a_script_sees_neither_the_files_nor_the_directory_of_another(mode):
    """Run one after another (parallel=1), so the second runs in the directory the first wrote into."""
    write = "import os\nopen('left.txt', 'w').write('x')\nos.mkdir('sub')\nprint(os.getcwd())"
    look = "import os\nprint(sorted(os.listdir('.')))\nprint(os.getcwd())"
    first, second = run_python_batch([(write, ""), (look, "")], limits=LIMITS, mode=mode, parallel=1)
    assert first.ok and second.ok, (first, second)
    assert second.stdout.splitlines()[0] == "[]"
    outside = f"open({os.path.dirname(first.stdout.strip())!r} + '/other.txt', 'w')"
    [escape] = run_python_batch([(outside, "")], limits=LIMITS, mode=mode)
    assert escape.returncode == 1 and "PermissionError" in escape.stderr


def test_scripts_without_a_result_run_again_alone(monkeypatch):
    """When the supervisor ends before some scripts report (here: their lines dropped), those run alone."""
    real = sandbox_batch._run_batch

    def lossy(workdir, jobs, limits, iso, parallel):
        lines, pid, iso = real(workdir, jobs, limits, iso, parallel)
        return [line for line in lines if line["i"] % 2 == 0], pid, iso
    monkeypatch.setattr(sandbox_batch, "_run_batch", lossy)
    alone = []
    monkeypatch.setattr(sandbox_batch, "run_python", lambda code, **kw: alone.append(code) or run_python(code, **kw))
    jobs = [(f"print({i})", "") for i in range(5)]
    results = run_python_batch(jobs, limits=LIMITS)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(5)]
    assert alone == ["print(1)", "print(3)"]


def test_large_stdin_and_order(mode):
    big = "y" * 200_000                              # more than a pipe holds
    jobs = [("import sys\nprint(len(sys.stdin.read()))", big)] + [(f"print({i})", "") for i in range(6)]
    results = run_python_batch(jobs, limits=LIMITS, mode=mode, parallel=3)
    assert [r.stdout for r in results] == ["200000\n"] + [f"{i}\n" for i in range(6)]


def test_bad_arguments():
    assert run_python_batch([]) == []
    with pytest.raises(InvalidArgument):
        run_python_batch([("print(1)",)])           # type: ignore[list-item]
    with pytest.raises(InvalidArgument):
        run_python_batch([("print(1)", "")], parallel=0)
