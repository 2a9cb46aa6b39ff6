"""Run directories and resume under damage: one run per --out, checksummed checkpoints with a fallback to the
newest intact one, hard errors for checkpoints that do not belong to the run, and a failed start that leaves the
directory as it was."""
import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv4.checkpoint import CheckpointError
from dsv4.cli import main
from conftest import stdlib_corpus
from dsv4.config import ConfigError
from dsv4.train.config import TrainConfig, resolve_config
from dsv4.train.metrics import read_metrics
from dsv4.train.trainer import train

SETTINGS = dict(steps=2, batch_size=2, seq_len=64, eval_interval=1, eval_batches=1, save_interval=1,
                log_interval=1, warmup=1, sample_tokens=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return stdlib_corpus(tmp_path_factory.mktemp("corpus"), 200_000, 20)


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """A 2-step run with checkpoints at steps 1 and 2 (tests work on copies)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(TrainConfig(data=corpus, out=str(out), **SETTINGS))
    return out


@pytest.fixture
def run(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def _step(run, k):
    return run / "checkpoints" / f"step_{k:07d}"


def _resume(run, **overrides):
    return train(resolve_config(resume=str(run), overrides=overrides), resume=str(run))


def test_a_new_run_refuses_a_non_empty_out(run, corpus):
    before = sorted(os.listdir(run)), (run / "train_config.json").read_bytes()
    with pytest.raises(ConfigError, match=r"is not empty.*--resume .*--overwrite"):
        train(TrainConfig(data=corpus, out=str(run), **SETTINGS))
    assert (sorted(os.listdir(run)), (run / "train_config.json").read_bytes()) == before
    with pytest.raises(ConfigError, match="choose one"):
        train(TrainConfig(data=corpus, out=str(run), **SETTINGS), resume=str(run), overwrite=True)


def test_overwrite_replaces_the_previous_run_only(run, corpus):
    (run / "notes.txt").write_text("mine")
    res = train(TrainConfig(data=corpus, out=str(run), **{**SETTINGS, "steps": 1}), overwrite=True)
    assert res["steps"] == 1
    # the old run's step 2 is gone: it would look newer than the new run's step 1 and be resumed in its place
    assert sorted(os.listdir(run / "checkpoints")) == ["step_0000001"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1]
    assert (run / "notes.txt").read_text() == "mine" and (run / "data_cache").is_dir()


def test_cli_prints_both_parameter_counts_and_refuses_a_second_run(finished, corpus, tmp_path, capsys):
    args = ["train", "--data", corpus, "--tokenizer", str(finished / "tokenizer"), "--out", str(tmp_path / "cli"),
            "--steps", "1", "--batch-size", "2", "--seq-len", "64", "--eval-batches", "1", "--sample-tokens", "0"]
    assert main(args) == 0
    assert "2.85M parameters, 3.42M with MTP" in capsys.readouterr().out
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "is not empty" in err and "--overwrite" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("damage", ["flip a bit of model.safetensors", "garbage train_state.pt",
                                    "truncate config.json", "remove tokenizer.json"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(run, damage, caplog):
    latest = _step(run, 2)
    if damage.startswith("flip"):
        data = bytearray((latest / "model.safetensors").read_bytes())
        data[len(data) // 2] ^= 0x10
        (latest / "model.safetensors").write_bytes(bytes(data))
    elif damage.startswith("garbage"):
        (latest / "train_state.pt").write_bytes(b"garbage: not a pickle")
    elif damage.startswith("truncate"):
        (latest / "config.json").write_text("{")
    else:
        (latest / "tokenizer.json").unlink()
    damaged_file = damage.split()[-1]
    with caplog.at_level(logging.INFO):
        res = _resume(run)
    assert res["steps"] == 2
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert damaged_file in warned and "step_0000001" in warned
    assert any("resumed from" in r.getMessage() and r.getMessage().endswith("at step 1") for r in caplog.records)
    from dsv4.train.checkpointing import checkpoint_problem
    assert checkpoint_problem(str(latest)) is None      # step 2 trained again and saved intact
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "lm" in r] == [1, 2]


def test_no_intact_checkpoint_is_an_error_naming_the_files(run):
    for k in (1, 2):
        (_step(run, k) / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint.*step_0000002.*train_state\.pt.*"
                                              r"step_0000001.*train_state\.pt"):
        _resume(run)


def test_a_garbage_train_state_without_a_manifest_is_an_error_naming_it(run):
    for k in (1, 2):  # as a checkpoint saved before manifests would be
        (_step(run, k) / "manifest.json").unlink(missing_ok=True)
    (_step(run, 2) / "train_state.pt").write_bytes(b"garbage: not a pickle")
    with pytest.raises(CheckpointError, match=r"step_0000002/train_state\.pt: not a readable training state"):
        _resume(run)


def test_an_empty_newer_step_dir_and_a_cut_metrics_line_do_not_block_resume(run, caplog):
    _step(run, 9).mkdir()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "tokens": 38')            # a kill -9 in the middle of a write
    with caplog.at_level(logging.WARNING):
        res = _resume(run, steps=3)
    assert res["steps"] == 3
    assert "step_0000009: empty" in caplog.text and "unfinished last row" in caplog.text
    with open(run / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]         # every line whole again
    assert [r["step"] for r in rows if "lm" in r] == [1, 2, 3]
    # the abandoned step 9 would otherwise look newer than this run's checkpoints
    assert sorted(os.listdir(run / "checkpoints")) == ["step_0000002", "step_0000003"]


def _rewrite_manifest(path):
    """After an edit made on purpose: the checkpoint is then intact, only wrong."""
    from dsv4.train.manifest import write_manifest
    if (path / "manifest.json").exists():
        write_manifest(str(path))


def test_a_checkpoint_without_mtp_tensors_is_an_error(run):
    for k in (1, 2):
        weights = _step(run, k) / "model.safetensors"
        save_file({n: t for n, t in load_file(weights).items() if not n.startswith("mtp.")}, weights)
        _rewrite_manifest(_step(run, k))
    with pytest.raises(CheckpointError, match=r"step_0000002: has no mtp\.\* tensors"):
        _resume(run)


def test_a_train_state_of_another_step_is_an_error(run):
    state = torch.load(_step(run, 1) / "train_state.pt", weights_only=True)
    torch.save(state, _step(run, 2) / "train_state.pt")
    _rewrite_manifest(_step(run, 2))
    with pytest.raises(CheckpointError, match=r"step_0000002: its training state is at step 1"):
        _resume(run)


def test_a_run_that_fails_to_start_keeps_the_directory_config(run, tmp_path):
    before = (run / "train_config.json").read_bytes()
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        _resume(run, data=str(tmp_path / "nonexistent"), steps=3)
    assert (run / "train_config.json").read_bytes() == before
    assert _resume(run)["steps"] == 2                   # the good run still resumes
