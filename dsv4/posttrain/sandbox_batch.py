"""Run many untrusted Python scripts in one sandboxed process, each still isolated from the others.

Why: a fresh sandboxed interpreter per script costs tens of milliseconds of start-up (namespaces, interpreter),
so a GRPO step's 256 code rewards took seconds; here one sandboxed interpreter (a supervisor, our code) starts
once and forks a child per script, which costs about a millisecond.

The supervisor runs exactly as `sandbox.run_python` runs code (the same interpreter flags, namespaces, `nobody`
as root, minimal environment, throwaway directory, wall clock and output limits on the whole process, everything
killed when it ends). Per script, a child of the supervisor:
- runs in a subdirectory no other running script has, emptied before the next script gets it (the audit hook's
  root: it cannot write another script's files, nor see what an earlier one left), its stdin in a pipe (a file
  where it is larger than a pipe holds) and its own stdout/stderr pipes, read by the supervisor up to
  `output_bytes` each (one byte more kills it: "output_limit");
- has its own wall clock (`timeout_s` from its start: "timeout"), CPU (`cpu_s`: "cpu_limit"), address space,
  file size and core limits, set after the fork;
- may not start processes (os.fork, forkpty, _posixsubprocess: they would count against the process limit the
  scripts share) nor signal any process but itself (the supervisor, its siblings); exec, sockets, ctypes are
  refused as in every sandbox run.
A script's failure (exception, crash, timeout, huge output) is its own result; a script that still ends the
supervisor (a raw `posix` call the hook does not see) costs only time: every script without a result then runs
again alone in `run_python`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Sequence

from ..errors import InvalidArgument
from .sandbox import (_HOOK, _UNSHARE_FLAGS, Isolation, Limits, SandboxResult, _kill_group, _remove_tree,
                      _supervise, isolation, run_python)

__all__ = ["run_python_batch"]

_STARTUP_S = 5.0            # the supervisor's own start and the sandbox set-up, beyond the scripts' clocks

# Runs in the sandboxed interpreter, in the batch directory: argv = [parallel, cpu_s, memory_bytes, file_bytes,
# max_processes, timeout_s, output_bytes]; batch.json holds the [code, stdin] pairs. Each script runs in a
# directory of its own while it runs (emptied after it for the next: creating and removing a directory per
# script took 3 ms on an ext4 disk), its stdin in a pipe. One JSON line per finished script on stdout (the
# scripts never hold that descriptor).
_SUPERVISOR = r'''
import json, os, selectors, shutil, signal, sys, time, resource
_par, _cpu, _mem, _fsize, _nproc = (int(a) for a in sys.argv[1:6])
_timeout, _limit = float(sys.argv[6]), int(sys.argv[7])
with open("batch.json", encoding="utf-8") as _f:
    _jobs = json.load(_f)
_n = len(_jobs)
for _name, _value in (("RLIMIT_NPROC", _nproc + _par + 4), ("RLIMIT_AS", _mem), ("RLIMIT_CORE", 0)):
    _res = getattr(resource, _name)
    _now = resource.getrlimit(_res)[1]
    _value = _value if _now == resource.RLIM_INFINITY else min(_value, _now)
    resource.setrlimit(_res, (_value, _value))
''' + _HOOK + r'''

def _child(i, slot, r_in, w_out, w_err):
    status = 1
    try:
        os.chdir(slot)
        os.dup2(r_in, 0)
        os.dup2(w_out, 1)
        os.dup2(w_err, 2)
        os.closerange(3, 1 << 16)
        for name, soft, hard in (("RLIMIT_CPU", _cpu, _cpu + 1), ("RLIMIT_AS", _mem, _mem),
                                 ("RLIMIT_FSIZE", _fsize, _fsize), ("RLIMIT_CORE", 0, 0)):
            res = getattr(resource, name)
            now = resource.getrlimit(res)[1]
            if now != resource.RLIM_INFINITY:
                hard, soft = min(hard, now), min(soft, now)
            resource.setrlimit(res, (soft, hard))
        os.setsid = os.setpgid = os.setpgrp = _no_new_group
        sys.addaudithook(_make_hook(os.path.realpath(os.getcwd()), batch=True))
        code = compile(_jobs[i][0], "main.py", "exec")
        sys.argv = ["main.py"]
        try:
            exec(code, {"__name__": "__main__", "__builtins__": __builtins__, "__file__": "main.py"})
            status = 0
        except SystemExit as e:
            if e.code is None:
                status = 0
            elif isinstance(e.code, int):
                status = e.code & 0xFF
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            import traceback
            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)

_sel = selectors.DefaultSelector()
_runs = {}                     # pid -> the state of a running script

_free = []                     # directories of finished scripts, emptied: the next scripts run in them
_made = 0

def _slot():
    global _made
    if _free:
        return _free.pop()
    _made += 1
    os.mkdir("w%d" % _made)
    return "w%d" % _made

def _empty(slot):
    """Remove what a script left in its directory; False when something stays (the directory is then dropped)."""
    def retry(func, path, exc):
        for p in (os.path.dirname(path), path):
            try:
                os.chmod(p, 0o700)
            except OSError:
                pass
        try:
            func(path)
        except OSError:
            pass
    try:
        os.chmod(slot, 0o700)
        for entry in os.scandir(slot):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, onerror=retry)
            else:
                os.unlink(entry.path)
        return not os.listdir(slot)
    except OSError:
        return False

def _stdin(i):
    """A pipe holding script i's stdin (closed for writing), or where it is larger than a pipe holds, the read
    end of a file in the batch directory."""
    data = _jobs[i][1].encode("utf-8")
    if len(data) < 60000:
        r, w = os.pipe()
        os.write(w, data)
        os.close(w)
        return r
    path = "stdin%d" % i
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDONLY)
    os.unlink(path)
    return fd

def _launch(i):
    slot = _slot()
    r_in = _stdin(i)
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    start = time.monotonic()
    try:
        pid = os.fork()
    except BlockingIOError:        # the process limit, reached by a running script: start this one later
        for fd in (r_in, r_out, w_out, r_err, w_err):
            os.close(fd)
        _free.append(slot)
        return False
    if pid == 0:
        _child(i, slot, r_in, w_out, w_err)
    for fd in (r_in, w_out, w_err):
        os.close(fd)
    run = {"i": i, "pid": pid, "start": start, "bufs": {r_out: bytearray(), r_err: bytearray()}, "out": r_out,
           "err": r_err, "reason": None, "status": None, "pidfd": None, "slot": slot}
    for fd in (r_out, r_err):
        os.set_blocking(fd, False)
        _sel.register(fd, selectors.EVENT_READ, run)
    try:
        run["pidfd"] = os.pidfd_open(pid)
        _sel.register(run["pidfd"], selectors.EVENT_READ, run)
    except (AttributeError, OSError):
        pass
    _runs[pid] = run
    return True

def _read(run, fd):
    """One read of a script's stream: True when it gave bytes (there may be more)."""
    try:
        chunk = os.read(fd, 1 << 16)
    except BlockingIOError:
        return False
    if not chunk:
        _sel.unregister(fd)
        return False
    buf = run["bufs"][fd]
    room = _limit - len(buf)
    buf += chunk[:room]
    if len(chunk) > room and run["reason"] is None:
        run["reason"] = "output_limit"
        _kill(run)
    return run["reason"] != "output_limit"

def _kill(run):
    if run["status"] is None:
        try:
            os.kill(run["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass

def _reap():
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid in _runs:
            _runs[pid]["status"] = status
            _runs[pid]["wall"] = time.monotonic() - _runs[pid]["start"]

def _finish(run):
    until = time.monotonic() + 0.5
    live = [fd for fd in (run["out"], run["err"]) if fd in _sel.get_map()]
    while live and run["reason"] != "output_limit" and time.monotonic() < until:
        for fd in live:
            while _read(run, fd):
                pass
        live = [fd for fd in live if fd in _sel.get_map()]
        if live:                   # a write end still open elsewhere: wait a little for it
            time.sleep(0.002)
    for fd in (run["out"], run["err"], run["pidfd"]):
        if fd is not None:
            if fd in _sel.get_map():
                _sel.unregister(fd)
            os.close(fd)
    line = json.dumps({"i": run["i"], "status": run["status"], "reason": run["reason"], "wall": run["wall"],
                       "stdout": run["bufs"][run["out"]].decode("utf-8", "replace"),
                       "stderr": run["bufs"][run["err"]].decode("utf-8", "replace")}) + "\n"
    data = line.encode()
    while data:
        data = data[os.write(1, data):]
    if _empty(run["slot"]):
        _free.append(run["slot"])
    del _runs[run["pid"]]

_pending = list(range(_n - 1, -1, -1))
while _pending or _runs:
    while _pending and len(_runs) < _par:
        if not _launch(_pending[-1]):
            if not _runs:
                time.sleep(0.01)
            break
        _pending.pop()
    if not _runs:
        continue
    now = time.monotonic()
    for run in _runs.values():
        if run["status"] is None and run["reason"] is None and now - run["start"] > _timeout:
            run["reason"] = "timeout"
            _kill(run)
    wait = max(0.0, min(run["start"] + _timeout - now for run in _runs.values()))
    for key, _ in _sel.select(min(wait, 0.05)):
        run = key.data
        if key.fd != run["pidfd"] and run["reason"] != "output_limit":
            _read(run, key.fd)
    _reap()
    for run in [r for r in _runs.values() if r["status"] is not None]:
        _finish(run)
'''


def run_python_batch(jobs: Sequence[tuple[str, str]], *, limits: Limits | None = None,
                     mode: Isolation | None = None, parallel: int | None = None) -> list[SandboxResult]:
    """Run each (code, stdin) of `jobs` as a script, `limits` applying to each script alone, up to `parallel`
    at a time (default: the CPUs, at most 8); the results in order. Never raises for anything the code does."""
    for job in jobs:
        if not (isinstance(job, (tuple, list)) and len(job) == 2 and all(isinstance(x, str) for x in job)):
            raise InvalidArgument("run_python_batch: every job must be a (code: str, stdin: str) pair")
    if parallel is None:
        parallel = max(1, min(8, os.cpu_count() or 1))
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise InvalidArgument(f"run_python_batch: parallel={parallel!r} must be a positive integer")
    if not jobs:
        return []
    limits = limits or Limits()
    iso = mode or isolation()
    workdir = tempfile.mkdtemp(prefix="dsv4-sandbox-batch-")
    try:
        lines, pid, iso = _run_batch(workdir, jobs, limits, iso, parallel)
    finally:
        _remove_tree(workdir)
    results: list[SandboxResult | None] = [None] * len(jobs)
    for line in lines:
        results[line["i"]] = _result(line, pid, iso)
    for i, r in enumerate(results):
        if r is None:                    # the supervisor ended before this script did: run it alone
            results[i] = run_python(jobs[i][0], stdin=jobs[i][1], limits=limits, mode=iso)
    return results  # type: ignore[return-value]


def _result(line: dict, pid: int, iso: Isolation) -> SandboxResult:
    status, reason = line["status"], line["reason"]
    returncode = os.waitstatus_to_exitcode(status) if status is not None else None
    if reason is None and returncode is not None and returncode < 0:
        sig = -returncode
        reason = "cpu_limit" if sig == signal.SIGXCPU else f"signal {signal.Signals(sig).name}" \
            if sig in signal.valid_signals() else f"signal {sig}"
    return SandboxResult(returncode=returncode, stdout=line["stdout"], stderr=line["stderr"],
                         timed_out=reason == "timeout", killed_reason=reason, wall_s=float(line["wall"]), pid=pid,
                         isolation=iso)


def _run_batch(workdir: str, jobs: Sequence[tuple[str, str]], limits: Limits, iso: Isolation,
               parallel: int) -> tuple[list[dict], int, Isolation]:
    """Start the supervisor on `jobs` in `workdir`; its result lines (those that parse), its
    process group, the isolation it ran under."""
    path = os.path.join(workdir, "batch.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump([list(job) for job in jobs], f)
    ids = {}
    if iso.uid is not None:
        for p in (workdir, path):
            os.chown(p, iso.uid, iso.gid)
        ids = {"user": iso.uid, "group": iso.gid, "extra_groups": []}
    rounds = math.ceil(len(jobs) / parallel)
    # The whole run: every round of scripts at its wall clock; each script's output, escaped in JSON (at most 6
    # characters a byte), on one line.
    outer = Limits(timeout_s=rounds * limits.timeout_s + _STARTUP_S, cpu_s=limits.cpu_s,
                   output_bytes=len(jobs) * (12 * limits.output_bytes + 1024))
    argv = [*([shutil.which("unshare") or "unshare", *_UNSHARE_FLAGS] if iso.namespaces else []),
            iso.python, "-I", "-S", "-X", "utf8", "-c", _SUPERVISOR,
            str(parallel), str(limits.cpu_s), str(limits.memory_mb << 20), str(limits.file_bytes),
            str(limits.max_processes), str(limits.timeout_s), str(limits.output_bytes)]
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=workdir, env=env, start_new_session=True, close_fds=True, **ids)
    try:
        out, _err, _reason = _supervise(proc, outer, start)
    finally:
        _kill_group(proc.pid)
        proc.wait()
    lines = []
    for raw in out.decode("utf-8", "replace").splitlines():
        try:
            line = json.loads(raw)
            if isinstance(line, dict) and 0 <= int(line["i"]) < len(jobs):
                lines.append(line)
        except (ValueError, KeyError, TypeError):
            continue                     # a line cut by the outer limits: that script runs again alone
    return lines, proc.pid, iso
