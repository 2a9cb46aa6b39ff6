import json
import shutil
import subprocess
import sys

import pytest

from dsv4.cli import main


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("preset, total, active", [("flash", 284e9, 13e9), ("pro", 1.6e12, 49e9)])
def test_info_lands_on_published_counts(capsys, preset, total, active):
    rep = _json(capsys, ["info", "--preset", preset, "--json"])
    assert isinstance(rep["total_params"], int) and isinstance(rep["active_params"], int)
    assert abs(rep["total_params"] - total) / total < 0.02
    assert abs(rep["active_params"] - active) / active < 0.03
    assert round(rep["active_params"] / 1e9) == active / 1e9


def test_info_checkpoint_and_table(capsys, tmp_path):
    from dsv4 import ModelConfig
    ModelConfig.preset("tiny").save(tmp_path)
    rep = _json(capsys, ["info", "--checkpoint", str(tmp_path), "--json"])
    assert rep == _json(capsys, ["info", "--preset", "tiny", "--json"])
    assert main(["info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "csa" in out and "hca" in out and "window+hash" in out


def test_info_errors(capsys):
    assert main(["info", "--preset", "huge"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "dsv4", "info", "--preset", "tiny", "--json"], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out)["total_params"] > 0


def test_help_imports_neither_torch_nor_matplotlib():
    """`dsv4 --help` and every subcommand's --help answer without importing torch or matplotlib (seconds and
    hundreds of MB)."""
    code = ("import sys\nfrom dsv4.cli import main\nfrom dsv4.cli import _COMMANDS\n"
            "for argv in [['--help']] + [[c, '--help'] for c in _COMMANDS]:\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
            "heavy = sorted(m for m in ('torch', 'matplotlib', 'numpy', 'safetensors', 'tokenizers', 'fastapi', 'uvicorn')\n"
            "               if m in sys.modules)\n"
            "print(len(_COMMANDS), heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "8 []"


def test_public_names_are_still_exported():
    import dsv4
    assert dsv4.Transformer.__name__ == "Transformer" and callable(dsv4.load_model) and callable(dsv4.generate)
    import dsv4.generate.session  # noqa: F401 (importing the package must not shadow the function)
    assert callable(dsv4.generate) and dsv4.generate.__name__ == "generate"
    assert issubclass(dsv4.ConfigError, dsv4.DsV4Error) and issubclass(dsv4.CheckpointError, dsv4.DsV4Error)
    assert set(dsv4.__all__) <= set(dir(dsv4))


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokns", "5"], "unrecognized arguments: --max-new-tokns 5"),
    (["--max-new-tokens", "2.5"], "argument --max-new-tokens: invalid int value: '2.5'"),
    (["--top-k", "1.5"], "argument --top-k: invalid int value: '1.5'"),
])
def test_bad_flag_shows_the_subcommand_usage(capsys, argv, message):
    with pytest.raises(SystemExit) as excinfo:
        main(["generate", "--checkpoint", "x", "--prompt", "p", *argv])
    err = capsys.readouterr().err
    assert excinfo.value.code == 2
    assert err.startswith("usage: dsv4 generate ") and f"dsv4 generate: error: {message}" in err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    import dsv4
    cfg = dsv4.ModelConfig.preset("tiny").replace(
        n_layers=2, compress_ratios=(4, 16, 0), dim=32, vocab_size=64, n_routed_experts=4, moe_inter_dim=32,
        q_lora_rank=16, o_lora_rank=16, head_dim=32, index_n_heads=4, index_head_dim=16, hc_mult=2)
    path = tmp_path_factory.mktemp("cli") / "ckpt"
    dsv4.save_model(dsv4.Transformer(cfg).init_weights(seed=1), path, dtype=torch.float32)
    return path


def _broken(src, dst, file, edit):
    """A copy of checkpoint `src` with `file` edited: config.json and the index as JSON, the safetensors header
    as its JSON."""
    shutil.copytree(src, dst)
    if file == "model.safetensors":
        raw = (dst / file).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        text = json.dumps(edit(json.loads(raw[8:8 + n]))).encode()
        text += b" " * (-len(text) % 8)
        (dst / file).write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    else:
        old = json.loads((dst / file).read_text()) if (dst / file).exists() else {}
        (dst / file).write_text(json.dumps(edit(old)))
    return dst


def _offsets_as_strings(header):
    entry = header[next(k for k in header if k != "__metadata__")]
    entry["data_offsets"] = [str(o) for o in entry["data_offsets"]]
    return header


def _set(key, value, within=None):
    def edit(d):
        (d[within] if within else d)[key] = value
        return d
    return edit


BROKEN = {   # name: (file, edit, what the message says)
    "header-list": ("model.safetensors", lambda h: list(h), "corrupt safetensors header (a JSON list"),
    "offsets-strings": ("model.safetensors", _offsets_as_strings, "data_offsets=['0', "),
    "eos-empty": ("config.json", _set("eos_token_id", []), "eos_token_id=[]: needs at least one token id"),
    "eos-float": ("config.json", _set("eos_token_id", 3.7), "eos_token_id=3.7: must be an integer"),
    "bos-bool": ("config.json", _set("bos_token_id", True), "bos_token_id=True: must be an integer"),
    "ratio-float": ("config.json", _set("compress_rates", {"compressed_sparse_attention": 3.7,
                                                           "heavily_compressed_attention": 16}),
                    "csa_ratio=3.7: must be an integer"),
    "rope-scaling-string": ("config.json", _set("rope_scaling", "yarn"), "rope_scaling='yarn': must be an object"),
    "beta-fast-string": ("config.json", _set("beta_fast", "32", within="rope_scaling"), "beta_fast='32'"),
    "weight-map-list": ("model.safetensors.index.json", lambda _: {"weight_map": ["model.safetensors"]},
                        "'weight_map' maps tensor names to shard files"),
}


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dsv4 {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_checkpoint_is_one_error_line(capsys, checkpoint, tmp_path, name):
    file, edit, message = BROKEN[name]
    d = _broken(checkpoint, tmp_path / name, file, edit)
    assert main(["generate", "--checkpoint", str(d), "--prompt", "p", "--device", "cpu"]) == 2
    line = _one_error_line(capsys.readouterr().err, "generate")
    assert message in line and str(d / file) in line


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "nan"], "temperature=nan: must be a finite number >= 0"),
    (["--temperature", "-1"], "temperature=-1.0: must be a finite number >= 0"),
    (["--top-p", "1.5"], "top_p=1.5: must be in (0, 1]"),
    (["--top-p", "nan"], "top_p=nan: must be in (0, 1]"),
    (["--top-k", "-2"], "top_k=-2: must be >= 0"),
    (["--max-new-tokens", "-3"], "max_new_tokens=-3: must be >= 0"),
    (["--device", "cuda:99"], "device='cuda:99': "),
    (["--device", "tpu7"], "device='tpu7': not a device here"),
])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_argument_is_one_error_line(capsys, checkpoint, command, argv, message):
    prompt = ["--prompt", "p"] if command == "generate" else []
    assert main([command, "--checkpoint", str(checkpoint), *prompt, *argv]) == 2
    assert message in _one_error_line(capsys.readouterr().err, command)


def test_run_directory_hints_at_its_final_checkpoint(capsys, checkpoint, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run / "final")
    shutil.copytree(checkpoint, run / "checkpoints" / "step_0000100")
    assert main(["generate", "--checkpoint", str(run), "--prompt", "p", "--device", "cpu"]) == 2
    line = _one_error_line(capsys.readouterr().err, "generate")
    assert f"did you mean {run / 'final'}? It also holds {run / 'checkpoints' / 'step_0000100'}" in line


def test_debug_prints_the_traceback(capsys, checkpoint, monkeypatch):
    argv = ["generate", "--checkpoint", str(checkpoint), "--prompt", "p", "--temperature", "nan"]
    monkeypatch.setenv("DSV4_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "InvalidArgument: temperature=nan" in err
    assert err.strip().splitlines()[-1].startswith("dsv4 generate: error: temperature=nan")
    monkeypatch.delenv("DSV4_DEBUG")
    assert main(argv + ["--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_errors_from_elsewhere_name_their_type_and_bugs_keep_their_traceback(capsys, monkeypatch):
    from dsv4.cli import info

    def fail(error):
        def run(args):
            raise error
        return run
    monkeypatch.setattr(info, "run", fail(ValueError("odd value")))
    assert main(["info", "--preset", "tiny"]) == 2
    assert _one_error_line(capsys.readouterr().err, "info") == \
        "dsv4 info: error: odd value (ValueError; DSV4_DEBUG=1 shows where it was raised)"
    monkeypatch.setattr(info, "run", fail(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        main(["info", "--preset", "tiny"])


def test_train_on_missing_cuda_is_one_line(tmp_path):
    """`dsv4 train --device cuda` on a machine without CUDA is refused with a line naming the device."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = subprocess.run([sys.executable, "-m", "dsv4", "train", "--device", "cuda", "--steps", "1",
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "device='cuda'" in r.stderr, r.stderr[-2000:]


def test_chat_has_no_prefix_store_flag():
    """chat keeps its own cache across turns; a --prefix-store it would ignore is not offered."""
    r = subprocess.run([sys.executable, "-m", "dsv4", "chat", "--checkpoint", "x", "--prefix-store", "d"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unrecognized arguments: --prefix-store" in r.stderr, r.stderr
