"""The memory check before a run builds anything: a model far beyond the machine is refused up front with the
estimate and what the device has; the estimate scales the way training memory does; the README's size of the
default model is what training reports."""
import re
from pathlib import Path

import pytest
import torch

import dsv4.train.trainer as trainer
from dsv4.cli import main
from dsv4.config import ConfigError
from dsv4.train.config import TrainConfig


class _PastTheCheck(Exception):
    """Raised where the run would start preparing data (tokenizer training, tokenization)."""


@pytest.fixture
def no_data_prep(monkeypatch):
    def stop(*args, **kwargs):
        raise _PastTheCheck
    monkeypatch.setattr(trainer, "prepare_data", stop)


def test_a_model_far_beyond_the_machine_is_refused_before_anything_is_built(no_data_prep, tmp_path):
    out = tmp_path / "flash"
    with pytest.raises(ConfigError, match=r"--preset flash needs at least [\d.]+ TB of memory .*290\.94B parameters"
                                          r".*but this machine has [\d.]+ [GMT]B.*--skip-memory-check"):
        trainer.train(TrainConfig(preset="flash", out=str(out), device="cpu"))
    assert not out.exists()
    with pytest.raises(_PastTheCheck):  # insisting skips the check
        trainer.train(TrainConfig(preset="flash", out=str(out), device="cpu"), check_memory=False)


def test_the_cli_refuses_in_one_line(no_data_prep, tmp_path, capsys):
    assert main(["train", "--preset", "flash", "--device", "cpu", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "TB of memory" in err


def test_the_default_run_passes_and_the_estimate_scales(no_data_prep, tmp_path, monkeypatch):
    from dsv4.train import memory
    with pytest.raises(_PastTheCheck):
        trainer.train(TrainConfig(out=str(tmp_path / "tiny"), device="cpu"))
    base = memory.estimate_memory(TrainConfig(preset="small"))
    assert base.params == sum(memory.count_params(TrainConfig(preset="small").model()))
    assert memory.estimate_memory(TrainConfig(preset="small"), world=2).states == base.states // 2
    assert memory.estimate_memory(TrainConfig(preset="small", optimizer="adamw")).states > base.states
    assert memory.estimate_memory(TrainConfig(preset="small", batch_size=16)).activations == 2 * base.activations
    assert memory.estimate_memory(TrainConfig(preset="small", activation_checkpointing="block")).activations \
        < base.activations / 2
    monkeypatch.setattr(memory, "device_memory", lambda device: base.total - 1)
    with pytest.raises(ConfigError, match="--preset small needs at least"):
        memory.check_fits(TrainConfig(preset="small"), torch.device("cpu"))
    monkeypatch.setattr(memory, "device_memory", lambda device: base.total)
    assert memory.check_fits(TrainConfig(preset="small"), torch.device("cpu")) == base


def test_cpu_memory_is_read():
    from dsv4.train.memory import device_memory
    assert 2**28 < device_memory(torch.device("cpu")) < 2**50


def test_the_readme_states_the_default_model_size_training_reports():
    from dsv4.train.memory import count_params
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    stated = re.search(r"a ([\d.]+)M-parameter V4 \(([\d.]+)M with the MTP block[;)]", readme)
    assert stated, "the README no longer states the default model's size"
    main_params, mtp = count_params(TrainConfig().model())
    assert (float(stated[1]), float(stated[2])) == (round(main_params / 1e6, 1), round((main_params + mtp) / 1e6, 1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_memory_is_the_device_total():
    from dsv4.train.memory import check_fits, device_memory
    assert device_memory(torch.device("cuda")) == torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(ConfigError, match="but cuda"):
        check_fits(TrainConfig(preset="flash"), torch.device("cuda"))
