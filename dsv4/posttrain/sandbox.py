"""Run untrusted Python (a model's output) in a separate, limited process, never in the trainer's.

Each call starts a fresh interpreter (`python -I -S -X utf8`, stdlib only, no site-packages, no PYTHON*
variables) with `subprocess` in a new session, inside a throwaway temporary directory that is removed
afterwards, with a minimal environment (PATH, HOME/TMPDIR pointing into that directory, a UTF-8 locale).

What contains the code:
- wall clock: the parent reads the output with a deadline and kills the whole process group on expiry;
- CPU time (RLIMIT_CPU; SIGXCPU at the limit, SIGKILL a second later), address space (RLIMIT_AS), file size
  (RLIMIT_FSIZE), no core files, process count (RLIMIT_NPROC), all set in the child before the code runs;
- output: at most `output_bytes` per stream are kept; one byte more kills the group;
- nothing left running: the group is SIGKILLed whenever the run ends, before its leader is reaped (so its id
  cannot be reused meanwhile);
- namespaces, where `unshare --user --net --pid` works without root (probed once per process): the code runs
  with no network interfaces but a down loopback, in its own pid namespace, so every process it started dies
  with it even if it left the process group. The code runs in a child of that namespace's pid 1 (pid 1 ignores
  signals it sends itself, so a crash of the code would otherwise look like a clean exit);
- in every mode an audit hook (`sys.addaudithook`, installed before the code runs, cannot be removed) refuses
  sockets, starting other programs (exec, spawn, system, subprocess), importing ctypes, the garbage collector's
  object walks (which reach the hook's own state), and writing, creating, renaming or deleting files outside the
  sandbox directory; `os.setsid`/`setpgid`/`setpgrp` are replaced so
  a child cannot leave the group. Without namespaces this hook is the network barrier: it stops Python code,
  not native code (which ctypes would have given);
- run as root, the code runs as `nobody` when an interpreter is found that `nobody` can execute (root is not
  bound by RLIMIT_NPROC and may write anywhere).
"""
from __future__ import annotations

import functools
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from ..errors import InvalidArgument

__all__ = ["Limits", "Isolation", "SandboxResult", "isolation", "run_python"]

_UNSHARE_FLAGS = ("--user", "--net", "--pid", "--fork", "--kill-child")


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 2.0            # wall clock for the whole run
    cpu_s: int = 2                    # CPU seconds per process (RLIMIT_CPU)
    memory_mb: int = 256              # address space per process (RLIMIT_AS)
    output_bytes: int = 64 * 1024     # kept per stream (stdout, stderr); more kills the run
    file_bytes: int = 1 << 20         # largest file the code may write (RLIMIT_FSIZE)
    max_processes: int = 16           # RLIMIT_NPROC; the sandbox's own processes (up to 3) count too

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_s", "memory_mb", "output_bytes", "file_bytes", "max_processes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidArgument(f"sandbox Limits.{name} must be a positive number, got {value!r}")
        for name in ("cpu_s", "memory_mb", "output_bytes", "file_bytes", "max_processes"):
            if not isinstance(getattr(self, name), int):
                raise InvalidArgument(f"sandbox Limits.{name} must be an integer, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Isolation:
    """How this machine lets the sandbox contain code (see `isolation()`)."""
    python: str                       # the interpreter the code runs under
    namespaces: bool                  # run under `unshare --user --net --pid`
    uid: int | None = None            # drop to this uid/gid (when the trainer runs as root), else keep ours
    gid: int | None = None


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None            # the code's exit status; -N when signal N ended it
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None         # "timeout" | "output_limit" | "cpu_limit" | "signal SIGSEGV" ... | None
    wall_s: float
    pid: int                          # the process group (and session) the sandbox ran in
    isolation: Isolation | None = field(default=None, repr=False)   # how the run was contained

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed_reason is None


# The audit hook and the group lock of sandboxed code (module doc); `batch=True` adds what a sample of a batch
# (sandbox_batch.py) may not do: start processes (they would count against the other samples' process limit) or
# signal other processes (its siblings, the supervisor).
_HOOK = r'''
def _make_hook(root, batch=False):
    realpath, fspath, fsdecode = os.path.realpath, os.fspath, os.fsdecode
    own_pid = os.getpid()
    prefix = root + "/"
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    fs_events = frozenset(("os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.link", "os.symlink", "os.chmod",
                           "os.chown", "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.mkfifo",
                           "os.mknod", "shutil.rmtree", "shutil.copyfile", "shutil.copymode", "shutil.copystat",
                           "shutil.move"))
    exec_events = frozenset(("os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
                             "os.startfile", "pty.spawn"))
    def inside(path):
        if isinstance(path, int):
            return True
        try:
            path = fspath(path)
        except TypeError:
            return True
        if isinstance(path, bytes):
            path = fsdecode(path)
        full = realpath(path)
        return full == root or full.startswith(prefix) or full == "/dev/null"
    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            wants = (flags & writes) if isinstance(flags, int) else any(c in (mode or "") for c in "wax+")
            if wants and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory is not allowed")
        elif event.startswith("socket."):
            raise PermissionError("sandbox: no network")
        elif event in fs_events:
            for arg in args:
                if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg):
                    raise PermissionError(f"sandbox: {event} on {arg!r} outside the sandbox directory")
        elif event in exec_events:
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event == "import" and args[0] in ("ctypes", "_ctypes"):
            raise ImportError("sandbox: ctypes is not allowed")
        elif event in ("gc.get_objects", "gc.get_referrers", "gc.get_referents"):
            raise PermissionError(f"sandbox: {event} would reach this hook's state")
        elif batch and event in ("os.fork", "os.forkpty"):
            raise PermissionError("sandbox: a batch sample may not start processes")
        elif batch and event == "import" and args[0] == "_posixsubprocess":
            raise ImportError("sandbox: a batch sample may not start processes")
        elif batch and event in ("os.kill", "os.killpg", "signal.pthread_kill") and args[0] != own_pid:
            raise PermissionError("sandbox: a batch sample may signal only itself")
    return hook

def _no_new_group(*args):
    raise PermissionError("sandbox: leaving the process group is not allowed")

'''

# Runs in the sandboxed interpreter: argv = [cpu_s, memory_bytes, file_bytes, max_processes, status_fd].
_BOOTSTRAP = r'''
import os, sys, resource
_cpu, _mem, _fsize, _nproc, _status_fd = (int(a) for a in sys.argv[1:6])
if _status_fd >= 0:
    _pid = os.fork()
    if _pid:
        _, _status = os.waitpid(_pid, 0)
        os.write(_status_fd, str(_status).encode())
        os._exit(0)
    os.close(_status_fd)
for _name, _soft, _hard in (("RLIMIT_CPU", _cpu, _cpu + 1), ("RLIMIT_AS", _mem, _mem), ("RLIMIT_FSIZE", _fsize, _fsize),
                            ("RLIMIT_CORE", 0, 0), ("RLIMIT_NPROC", _nproc, _nproc)):
    _res = getattr(resource, _name)
    _now = resource.getrlimit(_res)[1]
    if _now != resource.RLIM_INFINITY:   # an unprivileged process cannot raise its hard limit: stay under it
        _hard, _soft = min(_hard, _now), min(_soft, _now)
    resource.setrlimit(_res, (_soft, _hard))

''' + _HOOK + r'''
os.setsid = os.setpgid = os.setpgrp = _no_new_group
sys.addaudithook(_make_hook(os.path.realpath(os.getcwd())))
with open("main.py", "rb") as _f:
    _code = compile(_f.read(), "main.py", "exec")
sys.argv = ["main.py"]
_globals = {"__name__": "__main__", "__builtins__": __builtins__, "__file__": "main.py"}
del _f, _make_hook, _no_new_group, _cpu, _mem, _fsize, _nproc, _status_fd, _name, _soft, _hard, _res, _now
exec(_code, _globals)
'''

_PROBE = "import resource, os\nos.getcwd()\n"


def _works(argv: list[str], uid: int | None, gid: int | None) -> bool:
    """Whether `argv` (ending in an interpreter) runs a probe the way `run_python` runs code: in a fresh
    temporary directory, as `uid` when given."""
    ids = {} if uid is None else {"user": uid, "group": gid, "extra_groups": []}
    workdir = tempfile.mkdtemp(prefix="dsv4-sandbox-probe-")
    try:
        if uid is not None:
            os.chown(workdir, uid, gid)
        done = subprocess.run(argv + ["-I", "-S", "-c", _PROBE], cwd=workdir, env={"PATH": "/usr/bin:/bin"},
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=20, **ids)
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        _remove_tree(workdir)
    return done.returncode == 0


@functools.lru_cache(maxsize=None)
def isolation() -> Isolation:
    """The strongest isolation this machine allows without root, probed once: whether unprivileged user, network
    and pid namespaces work, and (run as root) an interpreter the `nobody` user can execute."""
    python, uid, gid = sys.executable, None, None
    if os.geteuid() == 0:
        try:
            import pwd
            entry = pwd.getpwnam("nobody")
            nobody = (entry.pw_uid, entry.pw_gid)
        except (ImportError, KeyError):
            nobody = (65534, 65534)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        for candidate in (sys.executable, os.path.realpath(sys.executable), f"/usr/bin/python{version}",
                          f"/usr/local/bin/python{version}", "/usr/bin/python3"):
            if os.path.exists(candidate) and _works([candidate], *nobody):
                python, (uid, gid) = candidate, nobody
                break
    unshare = shutil.which("unshare")
    namespaces = unshare is not None and _works([unshare, *_UNSHARE_FLAGS, python], uid, gid)
    return Isolation(python=python, namespaces=namespaces, uid=uid, gid=gid)


def run_python(code: str, *, stdin: str = "", limits: Limits | None = None,
               mode: Isolation | None = None) -> SandboxResult:
    """Run `code` as a script in the sandbox, feeding it `stdin`; never raises for anything the code does."""
    if not isinstance(code, str):
        raise InvalidArgument(f"run_python: code must be a str, got {type(code).__name__}")
    limits = limits or Limits()
    iso = mode or isolation()
    workdir = tempfile.mkdtemp(prefix="dsv4-sandbox-")
    try:
        return _run_in(workdir, code, stdin, limits, iso)
    finally:
        _remove_tree(workdir)


def _run_in(workdir: str, code: str, stdin: str, limits: Limits, iso: Isolation) -> SandboxResult:
    with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
        f.write(code)
    stdin_path = os.path.join(workdir, ".stdin")
    with open(stdin_path, "w", encoding="utf-8") as f:
        f.write(stdin)
    ids = {}
    if iso.uid is not None:
        for path in (workdir, os.path.join(workdir, "main.py"), stdin_path):
            os.chown(path, iso.uid, iso.gid)
        ids = {"user": iso.uid, "group": iso.gid, "extra_groups": []}
    status_r, status_w = os.pipe() if iso.namespaces else (-1, -1)
    argv = [*( [shutil.which("unshare") or "unshare", *_UNSHARE_FLAGS] if iso.namespaces else []),
            iso.python, "-I", "-S", "-X", "utf8", "-c", _BOOTSTRAP,
            str(limits.cpu_s), str(limits.memory_mb << 20), str(limits.file_bytes), str(limits.max_processes),
            str(status_w)]
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    start = time.monotonic()
    try:
        with open(stdin_path, "rb") as stdin_file:
            proc = subprocess.Popen(argv, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=workdir, env=env, start_new_session=True, close_fds=True,
                                    pass_fds=(status_w,) if status_w >= 0 else (), **ids)
    except BaseException:
        if status_r >= 0:
            os.close(status_r)
            os.close(status_w)
        raise
    if status_w >= 0:
        os.close(status_w)
    try:
        out, err, reason = _supervise(proc, limits, start)
    finally:
        _kill_group(proc.pid)
        proc.wait()
        status = _read_status(status_r)
    wall = time.monotonic() - start
    returncode = proc.returncode
    if status is not None:
        returncode = os.waitstatus_to_exitcode(status)
    if reason is None and returncode is not None and returncode < 0:
        sig = -returncode
        reason = "cpu_limit" if sig == signal.SIGXCPU else f"signal {signal.Signals(sig).name}" \
            if sig in signal.valid_signals() else f"signal {sig}"
    return SandboxResult(returncode=returncode, stdout=out.decode("utf-8", "replace"),
                         stderr=err.decode("utf-8", "replace"), timed_out=reason == "timeout",
                         killed_reason=reason, wall_s=wall, pid=proc.pid, isolation=iso)


def _supervise(proc: subprocess.Popen, limits: Limits, start: float) -> tuple[bytes, bytes, str | None]:
    """Collect output until the group leader exits, the deadline passes or a stream overflows; the leader is
    not reaped here, so its process group id stays valid for the kill that follows."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    pidfd = _pidfd(proc.pid)
    if pidfd is not None:
        sel.register(pidfd, selectors.EVENT_READ)
    deadline = start + limits.timeout_s
    reason = None
    try:
        while reason is None and not _exited(proc.pid):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = "timeout"
                break
            wait = remaining if pidfd is not None else min(remaining, 0.02)
            for key, _ in sel.select(wait):
                if key.fd != pidfd and _read_into(key.fd, bufs[key.fd], limits.output_bytes, sel):
                    reason = "output_limit"
            if pidfd is None and not sel.get_map():
                time.sleep(0.005)
        _kill_group(proc.pid)
        # The group is dead, so every write end closes: read what is left up to EOF (bounded in time and size).
        drain_until = time.monotonic() + 1.0
        while reason != "output_limit" and any(fd in sel.get_map() for fd in bufs) \
                and time.monotonic() < drain_until:
            for key, _ in sel.select(0.05):
                if key.fd != pidfd and _read_into(key.fd, bufs[key.fd], limits.output_bytes, sel):
                    reason = "output_limit"
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
    out, err = bufs.values()
    return bytes(out), bytes(err), reason


def _read_into(fd: int, buf: bytearray, limit: int, sel: selectors.BaseSelector) -> bool:
    """Append what `fd` has to `buf`, keeping at most `limit` bytes; True when the stream went past the limit."""
    try:
        chunk = os.read(fd, 1 << 16)
    except BlockingIOError:
        return False
    if not chunk:
        sel.unregister(fd)
        return False
    room = limit - len(buf)
    buf += chunk[:room]
    return len(chunk) > room


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _exited(pid: int) -> bool:
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_status(fd: int) -> int | None:
    if fd < 0:
        return None
    try:
        os.set_blocking(fd, False)
        data = os.read(fd, 64)
    except OSError:
        data = b""
    finally:
        os.close(fd)
    return int(data) if data.strip().isdigit() else None


def _remove_tree(path: str) -> None:
    """Remove the sandbox directory even where the code made parts of it unreadable or unwritable."""
    def make_writable_and_retry(func, failed, _exc):
        for p in (os.path.dirname(failed), failed):
            try:
                os.chmod(p, 0o700)
            except OSError:
                pass
        if os.path.isdir(failed) and not os.path.islink(failed):
            shutil.rmtree(failed, ignore_errors=True)
        else:
            try:
                func(failed)
            except OSError:
                pass
    shutil.rmtree(path, onerror=make_writable_and_retry)
