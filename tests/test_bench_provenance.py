"""bench/provenance.py: the file names benchmark results get (date, device, commit, what)."""
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import provenance  # noqa: E402


@pytest.mark.parametrize("name, short", [
    ("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"), ("AMD Instinct MI300X", "mi300x"), ("Tesla V100-SXM2-16GB", "v100"),
    ("cpu", "cpu")])
def test_device_short_names(name, short):
    assert provenance.device_short_name(name) == short


def test_result_path_names_date_device_commit_and_what(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV4_COMMIT", "abc1234")
    monkeypatch.setenv("DSV4_RESULTS_DIR", str(tmp_path / "out"))
    path = provenance.result_path("kernels_sweep", device="cpu")
    assert os.path.dirname(path) == str(tmp_path / "out") and os.path.isdir(tmp_path / "out")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_cpu_abc1234_kernels_sweep\.json", os.path.basename(path))
    assert provenance.record("cpu")["commit"] == "abc1234"
    with pytest.raises(ValueError, match="what='a/b'"):
        provenance.result_path("a/b")


def test_commit_comes_from_git_without_an_override(monkeypatch):
    monkeypatch.delenv("DSV4_COMMIT", raising=False)
    commit = provenance.git_commit()
    assert commit == "nogit" or re.fullmatch(r"[0-9a-f]{7,}", commit)
