"""The sandbox contains what model-written code can do: each test runs code that breaks one limit and checks
that the limit, and nothing else, stopped it, and that no process of the run is left."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import socket
import tempfile
import time

import pytest

from dsv4.errors import InvalidArgument
from dsv4.posttrain.sandbox import Limits, isolation, run_python

FAST = Limits(timeout_s=2.0, cpu_s=2)


def _modes():
    iso = isolation()
    hook_only = pytest.param(dataclasses.replace(iso, namespaces=False), id="hook-only")
    if iso.namespaces:
        return [pytest.param(iso, id="namespaces"), hook_only]
    return [pytest.param(iso, id="namespaces", marks=pytest.mark.skip("no unprivileged namespaces here")),
            hook_only]


@pytest.fixture(params=_modes())
def mode(request):
    return request.param


def _alive_in_group(pgid: int) -> list[int]:
    """Processes (zombies excepted) whose process group or session is `pgid`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp, session = fields[0], int(fields[2]), int(fields[3])
        if state != "Z" and pgid in (pgrp, session):
            found.append(int(name))
    return found


def _assert_nothing_left(result) -> None:
    deadline = time.monotonic() + 2.0
    while _alive_in_group(result.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _alive_in_group(result.pid) == []


def _nproc_enforced(mode) -> bool:
    return os.geteuid() != 0 or mode.uid not in (None, 0)


def test_runs_code_with_stdin_in_a_minimal_environment(monkeypatch, mode):
    monkeypatch.setenv("DSV4_TRAINER_SECRET", "x")
    code = "import os, sys\nprint(sys.stdin.read().upper())\nprint(sorted(os.environ))\nprint(os.getpid())"
    result = run_python(code, stdin="hello", limits=FAST, mode=mode)
    assert result.ok and not result.timed_out, result
    lines = result.stdout.splitlines()
    assert lines[0] == "HELLO"
    assert "DSV4_TRAINER_SECRET" not in lines[1] and "PYTHONPATH" not in lines[1]
    assert int(lines[2]) != os.getpid()


def test_wall_clock_timeout_kills_a_sleeping_run():
    result = run_python("import time\nprint('start', flush=True)\ntime.sleep(60)",
                        limits=Limits(timeout_s=1.0, cpu_s=5))
    assert result.timed_out and result.killed_reason == "timeout" and not result.ok
    assert result.stdout == "start\n"
    assert result.wall_s < 3.0
    _assert_nothing_left(result)


def test_cpu_limit_kills_a_busy_loop():
    result = run_python("while True:\n    pass", limits=Limits(timeout_s=6.0, cpu_s=1))
    assert result.killed_reason == "cpu_limit" and not result.timed_out, result
    assert result.wall_s < 5.0
    _assert_nothing_left(result)


FORK_BOMB = """
import os, time
started = 0
for _ in range(64):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    started += 1
print(started, flush=True)
"""


def test_fork_bomb_is_contained_and_killed(mode):
    code = FORK_BOMB
    limits = Limits(timeout_s=3.0, cpu_s=2, max_processes=8)
    result = run_python(code, limits=limits, mode=mode)
    assert result.returncode == 0, result
    if _nproc_enforced(mode):
        assert int(result.stdout) <= limits.max_processes
    _assert_nothing_left(result)


def test_children_cannot_leave_the_process_group(mode):
    code = "import os\ntry:\n    os.setsid()\n    print('left')\nexcept PermissionError:\n    print('stayed')"
    assert run_python(code, limits=FAST, mode=mode).stdout.strip() == "stayed"


def test_huge_print_is_truncated_and_killed():
    result = run_python("while True:\n    print('x' * 1000)", limits=Limits(timeout_s=10.0, cpu_s=10,
                                                                              output_bytes=10_000))
    assert result.killed_reason == "output_limit" and not result.ok
    assert len(result.stdout) == 10_000
    assert result.wall_s < 5.0
    _assert_nothing_left(result)


def test_memory_hog_fails():
    result = run_python("x = bytearray(1 << 30)\nprint('allocated')", limits=Limits(memory_mb=128))
    assert result.returncode == 1 and "MemoryError" in result.stderr and "allocated" not in result.stdout


@pytest.mark.parametrize("code, signal_name", [("import os\nos.abort()", "SIGABRT"),
                                               ("import faulthandler\nfaulthandler._sigsegv()", "SIGSEGV")])
def test_crash_is_reported_not_ok(code, signal_name, mode):
    result = run_python(code, limits=FAST, mode=mode)
    assert result.returncode is not None and result.returncode < 0, result
    assert result.killed_reason == f"signal {signal_name}" and not result.ok


def test_no_network(mode):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                f"    print('connected')\nexcept Exception as e:\n    print('refused', type(e).__name__)")
        result = run_python(code, limits=FAST, mode=mode)
    assert result.stdout.startswith("refused"), result


@pytest.fixture
def open_dir():
    """A directory anyone may write to (so only the sandbox, not file permissions, keeps the code out)."""
    path = tempfile.mkdtemp(prefix="dsv4-test-outside-")
    os.chmod(path, 0o777)
    yield pathlib.Path(path)
    shutil.rmtree(path)


def test_writes_outside_the_directory_are_refused_and_the_directory_is_removed(open_dir, mode):
    outside = open_dir / "escaped.txt"
    code = f"""
import os
os.makedirs('sub/deeper')
open('sub/deeper/f.txt', 'w').write('data')
os.chmod('sub', 0)
print(os.getcwd())
for attempt in (lambda: open({str(outside)!r}, 'w'), lambda: os.rename('sub', {str(outside)!r})):
    try:
        attempt()
        print('wrote outside')
    except PermissionError:
        print('refused')
"""
    result = run_python(code, limits=FAST, mode=mode)
    workdir, *attempts = result.stdout.split()
    assert attempts == ["refused", "refused"], result
    assert not outside.exists()
    assert not os.path.exists(workdir)


def test_file_size_limit():
    code = ("try:\n    with open('big', 'wb') as f:\n        f.write(b'x' * 4096)\n    print('written')\n"
            "except OSError:\n    print('too big')")
    assert run_python(code, limits=Limits(file_bytes=1024)).stdout.strip() == "too big"
    assert run_python(code, limits=Limits(file_bytes=8192)).stdout.strip() == "written"


@pytest.mark.parametrize("field, value", [("timeout_s", 0), ("cpu_s", 1.5), ("memory_mb", -1), ("max_processes", True)])
def test_bad_limits_are_rejected(field, value):
    with pytest.raises(InvalidArgument, match=field):
        Limits(**{field: value})
