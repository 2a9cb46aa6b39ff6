"""Context parallelism (dsv4.distributed.context_parallel) on CPU with gloo, 2 and 4 ranks: logits, indexer KL and
gradients of one sequence split across ranks equal one process's whole-sequence forward (fp32), for sequence
lengths that put a rank boundary at every kind of place (tests/distributed/workers.py: cp_model has window 16,
CSA groups of 4, HCA groups of 8); and `torchrun -m dsv4.distributed.train --cp N` (with FSDP2 and expert
parallelism) trains as one process does."""
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from launch import free_port as _free_port, torchrun  # noqa: E402

from dsv4.train.config import TrainConfig  # noqa: E402
from dsv4.train.metrics import read_metrics  # noqa: E402
from dsv4.train.trainer import train  # noqa: E402

# [T, balanced, stage]: chunk length c = T / ranks (plain) or T / (2 ranks) (balanced, chunks r and 2N-1-r)
CASES = {
    2: [[12, False, "sparse"],    # c=6 < window; boundary inside a CSA group (6 % 4) and an HCA group (6 % 8)
        [16, False, "dense"],     # c=8: boundary on CSA and HCA group edges
        [42, False, "indexer"],   # c=21 > window: inside the window of later queries, inside both groups
        [24, True, "sparse"],     # balanced, c=6: rank 0's second chunk (18..23) takes rows from rank 1's chunks
        [64, True, "sparse"]],    # balanced, c=16 = window: on window and group edges; 16 CSA entries > top-4
    4: [[12, False, "sparse"],    # c=3 < CSA group: chunks completing no group, CSA overlap rows from 2 chunks,
                                  # window rows from 3 earlier chunks
        [40, True, "indexer"],    # balanced, c=5
        [72, True, "sparse"]],    # balanced, c=9
}


def _assert_exact(res: dict) -> None:
    for e in res["errors"]:
        case = (e["T"], e["balanced"], e["stage"])
        # logits: rel <= 1e-5 (seen: <= 1.3e-6, fp32 rounding of the rows computed in other shapes)
        assert e["logits"] <= 1e-5, (case, e["logits"])
        assert e["kl"] <= 1e-5, (case, e["kl"])
        assert (e["kl_value"] > 0) == (e["stage"] != "dense"), (case, e["kl_value"])   # the KL loss ran
        # a gradient is a sum over every token; where its terms cancel (mHC's head and scale parameters) fp32
        # rounding alone moves it by up to ~5e-3 relative: the one-process gradient from the batch's rows one
        # at a time (the same math) differs that much. Each tensor is within 1e-5 or within 10x that noise (the
        # largest of workers.ROUNDING_SAMPLES rounding perturbations).
        for name, (err, noise) in e["grads"].items():
            assert err <= max(1e-5, 10 * noise), (case, name, err, noise)


# -m slow: both sizes (the default run compares CP with one process in test_context_parallel_extras.py, at 2 ranks)
@pytest.mark.parametrize("n", [pytest.param(2, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)])
def test_context_parallel_equals_one_process(tmp_path, n):
    (tmp_path / "cp.json").write_text(json.dumps(CASES[n]))
    for res in torchrun("cp_exact", n, tmp_path):
        assert len(res["errors"]) == len(CASES[n])
        _assert_exact(res)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from conftest import stdlib_corpus
    return stdlib_corpus(tmp_path_factory.mktemp("corpus"), 400_000, 40)


def _train_cp(tmp_path, corpus, n: int, cp: int, contiguous: bool = False, **flags) -> list[dict]:
    args = dict(data=corpus, out=str(tmp_path / f"cp{n}x{cp}"), steps=4, batch_size=2, seq_len=48, dense_warmup_frac=0.25,
                indexer_warmup_frac=0.25, log_interval=1, eval_interval=2, eval_batches=1, sample_tokens=0,
                save_interval=100)
    args.update(flags)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "dsv4.distributed.train", "--cp", str(cp)]
    cmd += [a for k, v in args.items() for a in ("--" + k.replace("_", "-"), str(v))] + ["--contiguous"] * contiguous
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return read_metrics(os.path.join(args["out"], "metrics.jsonl"))


def _assert_same_run(cp_rows: list[dict], one_rows: list[dict], world: int, loose: dict | None = None) -> None:
    """loose: {(stage, key): rel} for values known to amplify fp32 rounding (the caller says why)."""
    assert len(cp_rows) == len(one_rows)
    for a, b in zip(cp_rows, one_rows):
        assert a.keys() == b.keys() and a["step"] == b["step"], (a, b)
        if "stage" in a:
            assert a["world"] == world and a["expert_load_max_over_mean"] == b["expert_load_max_over_mean"]
        # (seen: <= 3.3e-6 relative, the indexer KL of the sparse stage; 2.7e-6 the gradient norm)
        for key in ("loss", "lm", "mtp", "balance", "indexer_kl", "grad_norm", "mhc_gain", "val_loss"):
            if key in b:
                rel = (loose or {}).get((a.get("stage"), key), 2e-5)
                assert a[key] == pytest.approx(b[key], rel=rel), (key, a, b)


def test_cp_training_equals_one_process(tmp_path, corpus):
    """`torchrun -m dsv4.distributed.train --cp 2` (FSDP2 and expert parallelism over both ranks, each sequence
    split across them, balanced) through the dense, indexer warm-up and sparse stages: the metrics.jsonl of a
    one-process `dsv4 train` with the same flags and seed."""
    cp_rows = _train_cp(tmp_path, corpus, 2, 2)
    one = train(TrainConfig(data=corpus, out=str(tmp_path / "one"), steps=4, batch_size=2, seq_len=48,
                            dense_warmup_frac=0.25, indexer_warmup_frac=0.25, log_interval=1, eval_interval=2,
                            eval_batches=1, sample_tokens=0, save_interval=100,
                            tokenizer=str(tmp_path / "cp2x2" / "tokenizer")))
    assert one["steps"] == 4
    _assert_same_run(cp_rows, read_metrics(tmp_path / "one" / "metrics.jsonl"), 2)


@pytest.mark.slow
def test_cp_times_data_parallel_training_equals_one_process(tmp_path, corpus):
    """4 ranks as 2 data-parallel groups of --cp 2, plain chunks: FSDP2 and expert parallelism over all 4."""
    cp_rows = _train_cp(tmp_path, corpus, 4, 2, contiguous=True)
    one = train(TrainConfig(data=corpus, out=str(tmp_path / "one"), steps=4, batch_size=2, seq_len=48,
                            dense_warmup_frac=0.25, indexer_warmup_frac=0.25, log_interval=1, eval_interval=2,
                            eval_batches=1, sample_tokens=0, save_interval=100,
                            tokenizer=str(tmp_path / "cp4x2" / "tokenizer")))
    assert one["steps"] == 4
    _assert_same_run(cp_rows, read_metrics(tmp_path / "one" / "metrics.jsonl"), 4)
