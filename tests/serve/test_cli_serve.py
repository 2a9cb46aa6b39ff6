"""`dsv4 serve` on the command line: a missing serving package and bad values end in one line."""
import sys

import pytest

from dsv4.cli import main


def test_missing_serving_packages_say_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)   # import fastapi now raises ImportError
    assert main(["serve", "--checkpoint", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'dsv4[serve]'" in err and "fastapi" in err


@pytest.mark.parametrize("flag", [["--port", "0"], ["--max-batch", "0"], ["--max-seq-len", "-1"]])
def test_bad_values_are_one_line(flag, capsys):
    pytest.importorskip("fastapi")
    assert main(["serve", "--checkpoint", "nowhere", *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag[0] in err
