import json
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
