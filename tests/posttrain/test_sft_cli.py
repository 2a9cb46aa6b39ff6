"""`dsv4 sft` on a tiny base checkpoint: a few seconds end to end."""
import json

import sft_fixtures as fx
import torch

import dsv4
from dsv4.cli import main


def test_sft_command_trains_and_saves(tmp_path, capsys):
    base = fx.make_base(tmp_path / "base")
    data = fx.write_jsonl(tmp_path / "chats.jsonl", [fx.PLAIN, fx.THINKING] * 3)
    out = tmp_path / "sft"
    argv = ["sft", "--model", base, "--data", data, "--out", str(out), "--steps", "2", "--batch-size", "2",
            "--seq-len", "128", "--device", "cpu"]
    assert main(argv) == 0
    assert "finished 2 SFT steps" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and (out / "loss.png").is_file()
    assert json.load(open(out / "result.json"))["steps"] == 2
    tuned = dsv4.load_model(out / "final", dtype=torch.float32)
    before = dsv4.load_model(base, dtype=torch.float32)
    assert not torch.equal(tuned.state_dict()["layers.0.attn.wq_a.weight"],
                           before.state_dict()["layers.0.attn.wq_a.weight"])
    assert dsv4.Tokenizer.from_dir(out / "final").encode("hello") == dsv4.Tokenizer.from_dir(base).encode("hello")

    assert main(argv) == 2   # the run is there: refused without --overwrite
    assert "already holds a run" in capsys.readouterr().err


def test_sft_command_reports_bad_data(tmp_path, capsys):
    base = fx.make_base(tmp_path / "base")
    data = fx.write_jsonl(tmp_path / "chats.jsonl", [fx.PLAIN, '{"messages": [{"role": "bot"}]}'])
    assert main(["sft", "--model", base, "--data", data, "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"dsv4 sft: error: {data}:2: message 0 has unknown role 'bot'" in err and "Traceback" not in err
