"""bench/native_gemm.py starts and writes its JSON (the --tiny-cpu smoke run: tiny shapes, Triton interpreter)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_native_gemm_bench_smoke_run(tmp_path):
    out = tmp_path / "native.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))),
           "DSV4_COMMIT": "test", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "native_gemm.py"), "--tiny-cpu", "--out",
                          str(out), "--experts-swap", "64:2", "64:2:2:168"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["copy_gbps"] > 0
    cases = {r["case"] for r in doc["results"]}
    assert {"fp8 tiny", "fp4 tiny", "fp4 grouped moe"} <= cases
    for r in doc["results"]:   # the kernels agree with the references in the smoke run too
        assert r.get("rel_l2_vs_reference", r.get("rel_l2_vs_dequantised_reference")) < 1e-4, r
    swaps = [s for r in doc["results"] for s in r.get("experts_swap", [])]   # the sorted pairs, swapped and not
    assert [s["swap"] for s in swaps] == [False, True, True]
    # a split setting names its slices; the tiny experts' one-step K loops take one (swap_splits caps at the steps)
    assert [(s["gate_up_split"], s["down_split"]) for s in swaps] == [(None, None), (1, 1), (1, 1)]
    assert all(s["rel_l2_vs_dequantised_reference"] < 1e-4 for s in swaps), swaps
