"""The training loop: outputs, exact resume after kill -9, NaN stop, stages, QAT export, ablations, compare."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import dsv4
from conftest import stdlib_corpus
from dsv4.cli import main
from dsv4.train.config import TrainConfig
from dsv4.train.stages import set_stage, stage_at
from dsv4.train.trainer import TrainingDiverged, schedule_cut_short, train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return stdlib_corpus(tmp_path_factory.mktemp("corpus"), 400_000, 40)


def _cfg(corpus, out, **kw):
    base = dict(data=corpus, out=str(out), steps=6, batch_size=2, seq_len=64, eval_interval=3, eval_batches=2,
                save_interval=3, log_interval=1, warmup=2, sample_tokens=8)
    base.update(kw)
    return TrainConfig(**base)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_run_writes_everything_and_transformers_loads_it(corpus, tmp_path):
    res = train(_cfg(corpus, tmp_path / "run"))
    out = tmp_path / "run"
    rows = _metrics(out)
    assert rows[0] == {"step": 0, "tokens": 0, "val_loss": rows[0]["val_loss"]}
    assert [r["step"] for r in rows if "lm" in r] == [1, 2, 3, 4, 5, 6]
    assert all(k in rows[-1] for k in ("loss", "lm", "mtp", "val_loss", "tok_per_s", "mhc_gain", "lr"))
    assert (out / "loss.png").stat().st_size > 5000
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / "final" / f).is_file()
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000003", "step_0000006"]
    assert res["sample"].startswith("def fibonacci(n):")
    from transformers import DeepseekV4ForCausalLM
    hf = DeepseekV4ForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    ours = dsv4.load_model(out / "final", dtype=torch.float32)
    tokens = torch.randint(0, ours.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(tokens), hf(tokens, use_cache=False).logits
    assert ((a - b).abs().max() / b.abs().max()) < 1e-4


def test_kill_and_resume_matches_uninterrupted(corpus, tmp_path):
    """kill -9 after the first checkpoint, then --resume: the loss curve equals an uninterrupted run."""
    args = ["--data", corpus, "--steps", "8", "--batch-size", "2", "--seq-len", "64", "--eval-interval", "4",
            "--eval-batches", "2", "--save-interval", "3", "--log-interval", "1", "--warmup", "2",
            "--sample-tokens", "0"]
    # the uninterrupted run and the one to kill run side by side, one thread each (every run in the same setting)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    full_log = open(tmp_path / "full.log", "w")
    uninterrupted = subprocess.Popen([sys.executable, "-m", "dsv4", "train", *args, "--out", full], env=env,
                                     stdout=subprocess.DEVNULL, stderr=full_log)
    proc = subprocess.Popen([sys.executable, "-m", "dsv4", "train", *args, "--out", killed], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(killed, "checkpoints", "step_0000003")
    deadline = time.time() + 300
    while not os.path.isdir(ckpt) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(ckpt)
    subprocess.run([sys.executable, "-m", "dsv4", "train", "--resume", killed], check=True, env=env,
                   capture_output=True)
    uninterrupted.wait(timeout=300)
    full_log.close()
    assert uninterrupted.returncode == 0, (tmp_path / "full.log").read_text()[-3000:]
    a = [(r["step"], r.get("lm"), r.get("val_loss")) for r in _metrics(full)]
    b = [(r["step"], r.get("lm"), r.get("val_loss")) for r in _metrics(killed)]
    assert a == b


def test_nan_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    import dsv4.train.step as step
    real = step.loss_terms
    calls = {"n": 0}

    def poisoned(model, batch, weights, lm=True):
        loss, parts = real(model, batch, weights, lm=lm)
        calls["n"] += 1
        if calls["n"] == 5:
            loss = loss * float("nan")
            parts["loss"] = loss.detach()
        return loss, parts
    monkeypatch.setattr(step, "loss_terms", poisoned)
    with pytest.raises(TrainingDiverged, match=r"step 4: .*not finite.*step_0000003"):
        train(_cfg(corpus, tmp_path / "nan"))
    assert os.path.isdir(tmp_path / "nan" / "checkpoints" / "step_0000003")


def test_a_run_cut_before_the_sparse_stage_is_named():
    cfg = TrainConfig(steps=100, dense_warmup_frac=0.1, indexer_warmup_frac=0.05)
    # steps 0..14 are warm-up (dense, then indexer), 15.. sparse: a run ending after step 14 never trained sparse
    assert "step 15" in schedule_cut_short(cfg, 12, indexer=True) and "'indexer'" in schedule_cut_short(cfg, 12, True)
    assert "'dense'" in schedule_cut_short(cfg, 5, indexer=True)
    assert schedule_cut_short(cfg, 16, indexer=True) is None and schedule_cut_short(cfg, 100, indexer=True) is None
    assert "step 10" in schedule_cut_short(cfg, 5, indexer=False) and schedule_cut_short(cfg, 11, False) is None


def test_stage_schedule_and_indexer_only_warmup(corpus):
    cfg = TrainConfig(steps=100, dense_warmup_frac=0.1, indexer_warmup_frac=0.05)
    assert [stage_at(cfg, s) for s in (0, 9, 10, 14, 15, 99)] == ["dense", "dense", "indexer", "indexer",
                                                                    "sparse", "sparse"]
    # a model without an indexer (the dense-attention ablation) has no indexer warm-up
    assert [stage_at(cfg, s, indexer=False) for s in (9, 10, 14, 15)] == ["dense", "sparse", "sparse", "sparse"]
    from dsv4.train.losses import LossWeights, compute_loss
    model = dsv4.Transformer(dsv4.ModelConfig.preset("tiny")).init_weights()
    set_stage(model, "indexer")
    tokens = torch.randint(0, 2048, (2, 66))
    loss, parts = compute_loss(model, tokens, LossWeights(), lm=False)
    loss.backward()
    assert "lm" not in parts and parts["indexer_kl"] > 0
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(".indexer." in n for n in with_grad)


def test_qat_export_reads_back_with_same_logits(corpus, tmp_path):
    train(_cfg(corpus, tmp_path / "qat", qat="fp4", steps=3))
    trained = dsv4.load_model(tmp_path / "qat" / "final", dtype=torch.float32).set_qat(True)
    dsv4.save_model(trained, tmp_path / "fp4", dtype=torch.float32, expert_format="fp4")
    # the real FP4 model (exact e2m1 experts) with the same indexer FP4 round trips
    real = dsv4.load_model(tmp_path / "fp4", dtype=torch.float32).set_qat(True)
    assert real.config.expert_dtype == "fp4"
    tokens = torch.randint(0, trained.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert torch.equal(real(tokens), trained(tokens))


@pytest.mark.parametrize("flags, check", [
    (dict(attention="dense"), lambda c: set(c.compress_ratios) == {0} and c.window_size == 64),
    (dict(residual="none"), lambda c: c.hc_mode == "none" and c.hc_mult == 1),
    (dict(residual="hc"), lambda c: c.hc_mode == "hc"),
    (dict(mtp=0), lambda c: c.n_mtp_layers == 0 and len(c.compress_ratios) == c.n_layers),
])
def test_ablation_switches(flags, check):
    assert check(TrainConfig(seq_len=64, **flags).model())


def test_ablation_run_and_compare(corpus, tmp_path, capsys):
    train(_cfg(corpus, tmp_path / "v4", steps=3))
    train(_cfg(corpus, tmp_path / "adamw", steps=3, optimizer="adamw", residual="none", attention="dense", mtp=0))
    assert main(["compare", str(tmp_path / "v4"), str(tmp_path / "adamw"), "--plot", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "v4" in out and "adamw" in out and (tmp_path / "c.png").stat().st_size > 5000
    assert main(["compare", str(tmp_path)]) == 2


def test_progress_shows_no_validation_loss_before_there_is_one():
    from dsv4.train.progress import Progress
    row = {"stage": "dense", "loss": 7.0, "lm": 6.5, "tok_per_s": 100.0}
    bar = Progress(10, 0, show=False)
    bar.step(row)
    assert "nan" not in str(bar.bar.postfix) and "val" not in str(bar.bar.postfix)
    bar.evaluated(6.25)
    bar.step(row)
    assert "val=6.250" in str(bar.bar.postfix)


def test_time_limit_ends_the_run_as_its_last_step(corpus, tmp_path):
    """A spent time limit makes the current step the last: it is logged, evaluated and saved, final/ is written,
    and the learning rate is the one the full `steps` schedule gives at that step (not annealed early)."""
    out = tmp_path / "run"
    full = _cfg(corpus, out, steps=50)
    res = train(_cfg(corpus, out, steps=50, time_limit=1e-9))
    rows = _metrics(out)
    assert res["steps"] == 1 and [r["step"] for r in rows if "lm" in r] == [1]
    assert "val_loss" in rows[-1] and (out / "final" / "model.safetensors").is_file()
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000001"]
    from dsv4.train.optim import lr_at
    assert rows[-1]["lr"] == pytest.approx(lr_at(0, full.steps, full.lr, warmup=full.warmup, schedule=full.schedule,
                                                 min_ratio=full.min_lr_ratio))
    with pytest.raises(dsv4.config.ConfigError, match="time_limit"):
        TrainConfig(time_limit=0)
