"""One run per output directory. A new run writes into an empty or new directory; a directory holding files
is refused unless the run resumes it, or the user asked to overwrite it: then the previous run's outputs are
removed first (only the files a run writes; the content-keyed token cache stays, anything else is left alone).
Without this, the previous run's checkpoints would look newer than the new run's and be resumed in their place."""
from __future__ import annotations

import os
import shutil

from ..config import ConfigError

__all__ = ["RUN_OUTPUTS", "check_run_dir", "clear_run_outputs"]

RUN_OUTPUTS = ("checkpoints", "dcp", "final", "tokenizer", "metrics.jsonl", "loss.png", "result.json",
               "train_config.json")


def check_run_dir(out: str, *, resume: str | None = None, overwrite: bool = False) -> list[str]:
    """Raise ConfigError when a run may not write into `out`; returns the entries an overwrite removes
    (see `clear_run_outputs`)."""
    if resume and overwrite:
        raise ConfigError(f"--resume {resume} continues a run and --overwrite replaces one: choose one")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if resume and os.path.isdir(out) and os.path.isdir(resume) and os.path.samefile(resume, out):
        return []
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if entries and not overwrite:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise ConfigError(f"--out {out} is not empty ({shown}): a new run there would mix with what it holds. "
                          f"Continue that run with --resume {out}, choose another --out, or pass --overwrite to "
                          "replace the previous run's results")
    return [e for e in entries if e in RUN_OUTPUTS]


def clear_run_outputs(out: str, names: list[str]) -> None:
    """Remove the entries `names` (from `check_run_dir`) of the run directory `out`."""
    for name in names:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
