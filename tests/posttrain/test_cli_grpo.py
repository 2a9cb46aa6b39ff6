"""`dsv4 grpo` end to end on a tiny checkpoint with a stand-in environment registry."""
import json
import sys
import types

import pytest

from dsv4 import save_model
from dsv4.cli import main
from dsv4.train.tokenizer import train_bpe
from grpo_toys import CORPUS, LetterEnv, toy_model


@pytest.fixture
def toy_registry(monkeypatch):
    made = []

    def make_env(name, level="easy", **kw):
        made.append((name, level))
        return LetterEnv()
    registry = types.ModuleType("dsv4.posttrain.envs.registry")
    registry.make_env = make_env
    monkeypatch.setitem(sys.modules, "dsv4.posttrain.envs.registry", registry)
    return made


def test_grpo_command_writes_a_run(tmp_path, toy_registry, capsys):
    ckpt, out = tmp_path / "policy", tmp_path / "run"
    train_bpe(CORPUS, 300, ckpt)
    save_model(toy_model(n_layers=2, compress_ratios=(0, 4, 0)), ckpt)
    argv = ["grpo", "--model", str(ckpt), "--env", "toy", "--out", str(out), "--steps", "2", "--num-generations", "4",
            "--batch-prompts", "1", "--max-new-tokens", "3", "--eval-problems", "2", "--lr", "1e-3",
            "--routing-replay", "--device", "cpu", "--level", "medium"]
    assert main(argv) == 0
    assert toy_registry == [("toy", "medium")]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2] and all("drift" in r and "drift_unreplayed" in r for r in steps)
    assert steps[0]["drift"] < 1e-3          # replayed routing, fp32: the trainer agrees with the sampler
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / "final" / name).is_file(), name
    assert "held-out accuracy" in capsys.readouterr().out
    # a second run into the same directory is refused without --overwrite; bad flags are one-line errors
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv[:4] + [",", "--out", str(tmp_path / "x")]) == 2
    assert "at least one environment" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--num-generations", "0"]) == 2
    assert "num_generations" in capsys.readouterr().err


def test_grpo_command_samples_from_a_pool_on_the_direct_sampler(tmp_path, toy_registry, monkeypatch):
    """--pool wraps each environment in a ProblemPool of that size and --sampler reaches the GRPO config."""
    import dsv4.posttrain.grpo as grpo
    seen = {}
    real = grpo.grpo_train

    def spy(model, tokenizer, envs, cfg, **kw):
        seen.update(envs=envs, cfg=cfg)
        return real(model, tokenizer, envs, cfg, **kw)
    monkeypatch.setattr(grpo, "grpo_train", spy)
    ckpt = tmp_path / "policy"
    train_bpe(CORPUS, 300, ckpt)
    save_model(toy_model(n_layers=2, compress_ratios=(0, 4, 0)), ckpt)
    argv = ["grpo", "--model", str(ckpt), "--env", "toy", "--out", str(tmp_path / "run"), "--steps", "1",
            "--num-generations", "2", "--batch-prompts", "1", "--max-new-tokens", "3", "--eval-problems", "1",
            "--device", "cpu", "--sampler", "direct", "--pool", "3"]
    assert main(argv) == 0
    from dsv4.posttrain.envs.pool import ProblemPool
    env = seen["envs"]["toy"]
    assert seen["cfg"].sampler == "direct" and isinstance(env, ProblemPool) and len(env.problems) == 3
    assert main(argv[:-1] + ["-1", "--overwrite"]) == 2
