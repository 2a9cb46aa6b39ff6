"""bench/cp_gpu.py (context parallelism on N GPUs, one call) in its CPU mode: 2 gloo ranks through the script's
own torchrun launches, its result file's fields and numbers. On the CPU every computation is fp32, so context
parallelism must match one process as tests/test_context_parallel.py finds it does (<= 1e-5)."""
import glob
import json
import os
import subprocess
import sys

import pytest

# Smoke runs of a bench script (~30 s): under -m slow; context parallelism's exactness is tested by default in
# tests/distributed/test_context_parallel*.py.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_script(tmp_path, *args: str) -> dict:
    cmd = [sys.executable, os.path.join(REPO, "bench", "cp_gpu.py"), "--device", "cpu", "--nproc", "2",
           "--out", str(tmp_path), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [path] = glob.glob(str(tmp_path / "*_cpu_*_cp_gpu.json"))
    assert os.path.exists(path[:-len(".json")] + ".txt")
    with open(path) as f:
        return json.load(f)


def test_exactness_part(tmp_path):
    res = run_script(tmp_path, "--parts", "exact", "--exact-seq", "48", "--exact-steps", "1")
    assert res["nproc"] == 2 and res["backend"] == "gloo" and {"date", "device", "commit"} <= res.keys()
    ex = res["parts"]["exact"]
    assert ex["rc"] == 0 and not ex["failures"]
    [s] = ex["steps"]
    assert s["stage"] == "dense" and s["seq_len"] == 48
    assert abs(s["loss_cp"] - s["loss_one"]) <= 1e-5 * abs(s["loss_one"])
    assert ex["loss_rel_max"] <= 1e-5 and ex["logits_rel_max"] <= 1e-5 and ex["grad_rel_all_max"] <= 1e-5
    assert ex["grad_beyond_noise_step0"] == [] and not s["grads_missing"] and not s["grads_extra"]


def test_capacity_part_survives_a_failing_length(tmp_path):
    """The check and the steps; a length shorter than the 4 chunks of 2 balanced ranks fails on both ranks: it
    is reported and the lengths after it do not run."""
    res = run_script(tmp_path, "--parts", "capacity", "--check-len", "64", "--lengths", "64", "3", "128")
    cap = res["parts"]["capacity"]
    c = cap["check"]
    assert c["seq_len"] == 64 and not c["grads_missing"]
    # fp32 on the CPU: context parallel = one process, while the rounding-noise reference does move
    assert c["loss_rel"] <= 1e-5 and c["lanes_rel"] <= 1e-5 and c["grad_rel"] <= 1e-5
    assert c["lanes_noise_rel"] > 0
    ok, failed, not_run = cap["runs"]
    assert (ok["seq_len"], ok["status"], ok["local_tokens"]) == (64, "ok", 32)
    assert ok["predicted_gib"] > 0 and ok["step_s"] > 0 and ok["peak_gib_per_rank"] == [None, None]  # (no GPU)
    assert abs(ok["loss"] - c["loss_one"]) <= 1e-5 * abs(c["loss_one"])     # the same sequence, one process
    assert failed["seq_len"] == 3 and failed["status"] == "failed" and "shorter than the 4 chunks" in failed["error"]
    assert not_run["seq_len"] == 128 and not_run["status"] == "not run"
    assert cap["rc"] != 0 and "fsdp" not in res["parts"]


def test_fsdp_part(tmp_path):
    """The `--cp` placement (FSDP2 + expert parallelism + context parallelism): its step's loss is one
    process's loss of the same sequence (the tiny model, fp32, computed here)."""
    import torch

    import dsv4
    from dsv4.train.losses import lm_loss
    res = run_script(tmp_path, "--parts", "fsdp", "--fsdp-lengths", "64")
    [f] = res["parts"]["fsdp"]["runs"]
    assert (f["variant"], f["seq_len"], f["status"], f["local_tokens"]) == ("cp_fsdp", 64, "ok", 32)
    assert res["parts"]["fsdp"]["rc"] == 0
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights(seed=0)
    tokens = torch.randint(0, model.config.vocab_size, (1, 64 + 1 + len(model.mtp)),
                           generator=torch.Generator().manual_seed(64))
    with torch.no_grad():
        want = float(lm_loss(model, model.hidden(tokens[:, :64]), tokens[:, 1:65]))
    assert abs(f["loss"] - want) <= 1e-5 * abs(want), (f["loss"], want)
