"""`dsv4 distill` from checkpoint directories: outputs written, the student saved with its tokenizer, bad
flags reported in one line."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import dsv4
from dsv4.cli import main
from dsv4.cli.distill import parse_teachers

sys.path.insert(0, os.path.dirname(__file__))
from test_distill import ENVS, LETTERS, tiny  # noqa: E402

from dsv4.train.tokenizer import train_bpe  # noqa: E402


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    texts = [f"<｜User｜>{d}: say {c}.<｜Assistant｜></think>{c}<｜end▁of▁sentence｜>" for d in ENVS for c in LETTERS]
    dirs = {}
    for name, seed, std in (("student", 0, 0.02), ("math", 1, 0.06), ("code", 2, 0.06)):
        d = root / name
        tok = train_bpe(texts * 4, 300, d)
        dsv4.save_model(tiny(tok, seed, std), d, dtype=torch.float32)
        dirs[name] = str(d)
    return dirs


def test_distill_command_writes_its_outputs(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("dsv4.posttrain.distill_run.make_envs", lambda names: {n: ENVS[n] for n in names})
    out = tmp_path / "opd"
    argv = ["distill", "--student", checkpoints["student"], "--teachers",
            f"math={checkpoints['math']},code={checkpoints['code']}", "--env", "math,code", "--out", str(out),
            "--steps", "1", "--batch-prompts", "2", "--max-new-tokens", "4", "--eval-prompts", "1",
            "--optimizer", "adamw", "--no-progress"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 1] and "kl/math" in rows[1] and "kl/code" in rows[1]
    assert {"tokenizer.json", "config.json"} <= set(os.listdir(out / "final"))
    assert (out / "distill.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "opd" and "heldout_acc/math" in summary["final"]
    moved = dsv4.load_model(out / "final", dtype=torch.float32)
    before = dsv4.load_model(checkpoints["student"], dtype=torch.float32)
    assert not torch.equal(moved.head.weight, before.head.weight)


@pytest.mark.parametrize("teachers, env, message", [
    ("math", "math", "is not DOMAIN=DIR"),
    ("math=a,math=b", "math", "given twice"),
    ("math=a", "math,code", "no teacher"),
])
def test_distill_command_rejects_bad_flags(tmp_path, capsys, teachers, env, message):
    argv = ["distill", "--student", str(tmp_path), "--teachers", teachers, "--env", env, "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv4 distill: error:") and message in err


def test_parse_teachers():
    assert parse_teachers("math=/a, code=/b") == {"math": "/a", "code": "/b"}


def test_teacher_with_another_vocabulary_is_refused(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("dsv4.posttrain.distill_run.make_envs", lambda names: {n: ENVS[n] for n in names})
    other = tmp_path / "other"
    tok = train_bpe(["something else entirely, with other merges"] * 8, 300, other)
    dsv4.save_model(tiny(tok, 3), other, dtype=torch.float32)
    argv = ["distill", "--student", checkpoints["student"], "--teachers", f"math={other}", "--env", "math",
            "--out", str(tmp_path / "o"), "--steps", "1"]
    assert main(argv) == 2
    assert "another vocabulary" in capsys.readouterr().err
