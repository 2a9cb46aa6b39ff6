"""Scale-out on CPU with gloo, 2 and 4 processes launched by torchrun (tests/distributed/workers.py):
expert dispatch is exact, FSDP2 + EP + distributed Muon training equals one process, DCP checkpoints saved
on 4 ranks resume on 2, sharded inference equals one process, and the training loop under torchrun keeps the
single-process loop's behaviour (stages, NaN stop, validation loss, metrics, --config, resume)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import dsv4

sys.path.insert(0, os.path.dirname(__file__))
import launch  # noqa: E402
from launch import free_port as _free_port, torchrun  # noqa: E402
import workers  # noqa: E402

from conftest import assert_rel_close, stdlib_corpus  # noqa: E402
from dsv4.train.config import TrainConfig  # noqa: E402
from dsv4.train.metrics import read_metrics  # noqa: E402
from dsv4.train.optim import build_optimizers  # noqa: E402
from dsv4.train.trainer import train  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return stdlib_corpus(tmp_path_factory.mktemp("corpus"), 400_000, 40)


def _save_inference_checkpoint(out, native: bool) -> None:
    """OUT/ckpt for case_sharded_inference: bf16 weights in 1 MiB shards, or FP8 + FP4 read as native weights."""
    if native:
        cfg = dsv4.ModelConfig.preset("tiny").replace(o_lora_rank=128)   # every rank's slice on 128 x 128 tiles
        dsv4.save_model(dsv4.Transformer(cfg).init_weights(seed=4), out / "ckpt", dtype=torch.float32,
                        fp8_weights=True, expert_format="fp4")
        (out / "weights.txt").write_text("native")
    else:
        cfg = dsv4.ModelConfig.preset("tiny").replace(n_heads=8, o_groups=4)
        dsv4.save_model(dsv4.Transformer(cfg).init_weights(seed=4), out / "ckpt", dtype=torch.float32,
                        max_shard_bytes=1 << 20)


def _loop_config(corpus: str, out) -> dict:
    return dict(data=corpus, out=str(out / "dist"), steps=8, batch_size=4, seq_len=48, warmup=2,
                dense_warmup_frac=0.25, indexer_warmup_frac=0.25, save_interval=1, log_interval=1, eval_interval=2,
                eval_batches=2, sample_tokens=0)


def _shared_cases(request) -> launch.SharedCases:
    def nothing(out):
        pass

    def loop(out):
        (out / "loop.json").write_text(json.dumps(_loop_config(request.getfixturevalue("corpus"), out)))
    cases = {"test_sharded_native_inference_equals_one_process_native":
             (2, "sharded_inference", lambda out: _save_inference_checkpoint(out, True)),
             "test_torchrun_loop_stages_nan_stop_and_validation_match_one_process": (2, "loop", loop),
             "test_training_matches_one_process": (2, "train", nothing)}
    for n in (2, 4):
        cases[f"test_expert_dispatch_exact[{n}]"] = (n, "ep_dispatch", nothing)
        cases[f"test_checkpoint_resumes_exactly_on_fewer_ranks[{n}-{n // 2}]"] = (n, "save", nothing)
        cases[f"test_sharded_inference_equals_one_process[{n}]"] = (
            n, "sharded_inference", lambda out: _save_inference_checkpoint(out, False))
    return cases


@pytest.fixture(scope="module")
def launched(request, tmp_path_factory):
    """The worker cases of this module's selected tests, one torchrun per world size."""
    return launch.shared_launch(request, tmp_path_factory, _shared_cases(request))


@pytest.mark.parametrize("n", [2, pytest.param(4, marks=pytest.mark.slow)])   # 4 ranks: -m slow
def test_expert_dispatch_exact(launched, request, n):
    for res in launch.case_results(launched, request)[1]:
        assert res["all_to_all"] < 1e-6 and res["all_reduce"] < 1e-6, res


@pytest.mark.slow   # FSDP2 + EP training equal to one process: by default in test_cp_training_equals_one_process (with CP)
def test_training_matches_one_process(launched, request):
    dist_res = launch.case_results(launched, request)[1]
    model = workers.tiny_model()
    losses = workers.train_steps(model, build_optimizers(model, 3e-3), range(3), 0, 1, distributed=False)
    for a, b in zip(dist_res[0]["losses"], losses):
        assert abs(a - b) < 1e-5 * abs(b)
    state = dist_res[0]["state"]
    lr, steps = 3e-3, 3
    # AdamW's first steps are sign-like (m / sqrt(v) = +-1): an ulp of difference in a near-zero gradient (reduced
    # in another order across ranks, which depends on the CPU's vector width) can move an element's step by up to
    # lr per step. So none is further apart than those flips allow, and across the whole model almost every
    # element agrees to 1e-4. Counted over the model, not per tensor: a 24-element tensor with one such element
    # would otherwise fail on one CPU and pass on another.
    far, total = 0, 0
    for name, p in model.state_dict().items():
        if p.is_floating_point():
            diff = (state[name] - p).abs()
            assert diff.max() <= 2 * lr * steps, name
            far += int((diff > 1e-4).sum())
            total += diff.numel()
    assert far < 1e-4 * total, (far, total)
    assert dist_res[0]["losses"] == dist_res[1]["losses"]


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), pytest.param(4, 2, marks=pytest.mark.slow)])
def test_checkpoint_resumes_exactly_on_fewer_ranks(launched, request, saved_on, resumed_on):
    out, saved = launch.case_results(launched, request)
    resumed = torchrun("load", resumed_on, out)
    assert resumed[0]["step"] == 2
    for a, b in zip(saved[0]["continued"], resumed[0]["resumed"]):
        assert abs(a - b) < 1e-6 * abs(a)
    exported = dsv4.load_model(out / "official", dtype=torch.float32)   # the official single directory
    assert exported.config.n_routed_experts == 8 and len(exported.layers) == 4


@pytest.mark.parametrize("n", [2, pytest.param(4, marks=pytest.mark.slow)])   # 4 ranks: -m slow
def test_sharded_inference_equals_one_process(launched, request, n):
    out, ranks = launch.case_results(launched, request)
    ref_model = dsv4.load_model(out / "ckpt", dtype=torch.float32)
    tokens = torch.randint(0, 2048, (2, 70), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = ref_model(tokens)
    for res in ranks:
        assert_rel_close("sharded logits", res["logits"], ref, 1e-5)
        assert_rel_close("sharded incremental logits", res["incremental"], ref, 1e-5)


def test_sharded_native_inference_equals_one_process_native(launched, request):
    """2 ranks of an FP8 + FP4 checkpoint with native weights (each rank's FP8 head rows / group columns as bytes
    and scale tiles, its FP4 experts) give the one-process native model's logits."""
    out, ranks = launch.case_results(launched, request)
    ref_model = dsv4.load_model(out / "ckpt", dtype=torch.float32, weights="native")
    assert ref_model.layers[0].attn.wo_b.packed is not None
    tokens = torch.randint(0, 2048, (2, 70), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = ref_model(tokens)
    for res in ranks:
        assert_rel_close("sharded native logits", res["logits"], ref, 1e-5)
        assert_rel_close("sharded native incremental logits", res["incremental"], ref, 1e-5)


def test_torchrun_training_entry_point_config_and_resume_on_fewer_ranks(tmp_path, corpus):
    """`torchrun -m dsv4 train --config FILE` on 2 ranks (flags override the file), resumed on 1 rank."""
    out = tmp_path / "run"
    config = tmp_path / "run.json"
    config.write_text(json.dumps(dict(data=corpus, steps=3, batch_size=4, seq_len=48, save_interval=2, log_interval=1,
                                      eval_interval=2, eval_batches=1, sample_tokens=4, out=str(tmp_path / "x"))))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())

    def launch(n, *args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), "-m", "dsv4", "train", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-4000:]
    launch(2, "--config", str(config), "--out", str(out))
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["seq_len"], saved["batch_size"], saved["steps"], saved["out"]) == (48, 4, 3, str(out))
    assert sorted(os.listdir(out / "dcp")) == ["step_0000002", "step_0000003"]
    assert json.loads((out / "result.json").read_text())["sample"].startswith("def fibonacci(n):")
    launch(1, "--resume", str(out), "--steps", "4")
    rows = read_metrics(out / "metrics.jsonl")
    logged = [r for r in rows if "stage" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and [r["world"] for r in logged] == [2, 2, 2, 1]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 3, 4]
    assert all(r["tokens"] == r["step"] * 4 * 48 for r in rows)        # the config file's batch and sequence
    assert dsv4.load_model(out / "final", dtype=torch.float32).config.n_layers == 4
    assert (out / "final" / "tokenizer.json").is_file()


def _dcp_model_state(path, tmp_path) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP checkpoint, read in this (non-distributed) process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(path, tmp_path / "ckpt.pt")
    return torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"]


def test_torchrun_loop_stages_nan_stop_and_validation_match_one_process(launched, request, tmp_path, corpus):
    """One 2-rank launch of the training loop: no bias update in the indexer warm-up, the same metrics fields as
    one process (plus world), validation loss equal to one process's, and a NaN on one rank stopping every rank
    with the last good checkpoint named. The same launch checks DistributedMuon against Muon."""
    out, ranks = launch.case_results(launched, request)
    cfg = _loop_config(corpus, out)
    for res in ranks:
        assert res["muon_update_error"] < 1e-5, res
        assert re.match(r"step 6: loss=nan .*not finite.*dcp/step_0000006$", res["error"]), res["error"]
    dist_out = out / "dist"
    assert sorted(os.listdir(dist_out / "dcp")) == [f"step_{s:07d}" for s in range(1, 7)]
    # steps 0-1 dense, 2-3 indexer warm-up, 4- sparse; checkpoint k holds the state after step k - 1
    state = {k: _dcp_model_state(dist_out / "dcp" / f"step_{k:07d}", tmp_path) for k in range(1, 7)}
    bias = {k: torch.cat([t.flatten() for n, t in sorted(sd.items()) if n.endswith("gate.bias")])
            for k, sd in state.items()}
    assert not torch.equal(bias[1], bias[2]) and not torch.equal(bias[4], bias[5])
    assert torch.equal(bias[2], bias[3]) and torch.equal(bias[3], bias[4])
    for k in (3, 4):                        # the indexer warm-up: the indexers learn, nothing else moves
        moved = {n for n, t in state[k].items() if not torch.equal(t, state[k - 1][n])}
        assert moved and all(".indexer." in n for n in moved), moved

    one = train(TrainConfig(**{**cfg, "out": str(tmp_path / "one"), "tokenizer": str(dist_out / "tokenizer"),
                               "save_interval": 100}))         # (checkpoints do not change the run)
    assert one["steps"] == 8
    dist_rows, one_rows = read_metrics(dist_out / "metrics.jsonl"), read_metrics(tmp_path / "one" / "metrics.jsonl")
    logged = [r for r in dist_rows if "stage" in r]
    assert [r["stage"] for r in logged] == ["dense", "dense", "indexer", "indexer", "sparse", "sparse"]
    assert all(r["world"] == 2 for r in logged)
    # the same run as one process, to fp32 reduction order (seen: 1e-7 relative for the losses, 3e-6 for the
    # gradient norm); the expert loads are counts, reduced exactly
    for a, b in zip(logged, one_rows[1:]):
        assert a.keys() == b.keys() and a["step"] == b["step"], (a, b)
        assert a["expert_load_max_over_mean"] == pytest.approx(b["expert_load_max_over_mean"], rel=1e-6), (a, b)
        for key, tol in (("loss", 1e-5), ("grad_norm", 1e-4), ("mhc_gain", 1e-5)):
            assert a[key] == pytest.approx(b[key], rel=tol), (key, a, b)
    dist_val = {r["step"]: r["val_loss"] for r in dist_rows if "val_loss" in r}
    one_val = {r["step"]: r["val_loss"] for r in one_rows if "val_loss" in r}
    assert sorted(dist_val) == [0, 2, 4, 6]
    for step, v in dist_val.items():
        assert v == pytest.approx(one_val[step], rel=1e-5), (step, v, one_val[step])
