"""How the kernel tests run: natively on a GPU; on the CPU in Triton's interpreter, with every launch a test file
makes recorded and then compiled for real GPUs by that file's last test (`native_build`, see native_compile.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings

import pytest

try:
    import triton  # noqa: F401
except ImportError:  # no Triton on this machine: the references serve every call, there is nothing to test here
    collect_ignore_glob = ["test_*.py"]
else:
    from . import native_compile

from .device import INTERPRETED, ON_GPU


@pytest.fixture(autouse=True)
def _kernels_can_run() -> None:
    if not (ON_GPU or INTERPRETED):
        pytest.skip("no CUDA GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it unless told otherwise)")
    # the interpreter computes masked-off lanes too (numpy warns of their 0/0 and log 0); the kernels discard them
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")


@pytest.fixture(scope="module", autouse=True)
def _launches():
    """The distinct kernel launches the tests of one file make (recorded under the interpreter only)."""
    launches: dict[str, dict] = {}
    if not INTERPRETED:
        yield launches
        return
    with native_compile.recording(launches):
        yield launches


class _Compiler:
    """One process without TRITON_INTERPRET that compiles launches for the session (native_compile.serve), so
    torch and Triton are imported there once, not once per test file."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.stderr = tempfile.TemporaryFile(mode="w+")

    def failures(self, launches: list[dict]) -> dict[str, list[dict]]:
        if self.proc is None:
            import dsv4
            root = os.path.dirname(os.path.dirname(os.path.abspath(dsv4.__file__)))  # this dsv4, not another
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
            self.proc = subprocess.Popen([sys.executable, native_compile.__file__], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        self.proc.stdin.write(json.dumps(launches) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            self.stderr.seek(0)
            raise AssertionError("the compile process died:\n" + self.stderr.read()[-3000:])
        return json.loads(answer)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.stderr.close()


@pytest.fixture(scope="session")
def _compiler():
    compiler = _Compiler()
    yield compiler
    compiler.close()


def _exempt(failure: dict, target: str) -> bool:
    """The launches allowed not to build on sm_80, which lacks sm_89's e4m3 conversions and is never given them:
    the sparse attention's FP8 cache read (sparse_attn.supports), the FP8 weight GEMMs' hardware decode
    (packed_linear.has_e4m3) and the FP8 x FP8 GEMM (packed_linear.supports_fp8_fp8)."""
    if target != "sm_80":
        return False
    kernel, flags = failure["kernel"], failure["constexprs"]
    return (kernel.endswith("._sparse_attn_kernel") and bool(flags.get("FP8"))
            or kernel.endswith(("._fp8_weight_kernel", "._fp8_swiglu_kernel")) and bool(flags.get("NATIVE_FP8"))
            or kernel.endswith("._fp8_fp8_kernel"))


@pytest.fixture
def native_build(_launches, _compiler):
    """A check for a file's last test: every launch its tests made under the interpreter compiles for sm_90
    (H100/H200) and sm_80 (A100). The interpreter accepts code the compiler rejects, so a kernel can pass every
    CPU check and still fail to build on a GPU."""
    def check() -> None:
        if not INTERPRETED:
            pytest.skip("the kernels ran natively: they were built for this GPU")
        if not _launches:
            pytest.skip("no kernel launch recorded (this file's other tests did not run)")
        failed = _compiler.failures(list(_launches.values()))
        for target, errors in failed.items():
            errors = [e for e in errors if not _exempt(e, target)]
            assert not errors, f"kernels that do not compile for {target}:\n" + json.dumps(errors, indent=1)
    return check
