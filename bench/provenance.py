"""Where a benchmark result came from, and the file name that says so:

    bench/results/<date>_<device>_<commit>_<what>.<ext>      e.g. bench/results/2026-12-02_h200_4dec215_e2e.json

<date> is the day of the run, <device> a short name of the device it measured (h200, h100, a100, cpu),
<commit> the checkout's short git hash. The scripts in bench/ write their results there by default, and
BENCHMARKS.md cites those files. DSV4_RESULTS_DIR names another folder (bench/gpu_session.sh uses its $OUT);
on a machine whose copy of the tree has no git metadata, set DSV4_COMMIT.

    python bench/provenance.py            # the prefix for this machine and checkout: 2026-12-04_h200_5e49645
    python bench/provenance.py e2e json   # the whole path
"""
from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro", "amd", "instinct", "radeon", "intel"}


def device_short_name(name: str) -> str:
    """A device name as torch reports it -> a short lower-case model name for file names.

    'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA A100-SXM4-80GB' -> 'a100',
    'NVIDIA GeForce RTX 4090' -> 'rtx4090', 'AMD Instinct MI300X' -> 'mi300x', 'cpu' -> 'cpu'."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in _VENDOR_WORDS]
    for i, w in enumerate(words):
        if any(c.isdigit() for c in w):
            if w.isdigit() and i and words[i - 1].isalpha():  # "rtx 4090": the series name goes with the number
                return words[i - 1] + w
            return w
    return "-".join(words) or "unknown"


def current_device(device: str | None = None) -> str:
    """The device a run measures: the CUDA device's name when `device` is a CUDA device (or None and a GPU is
    there), otherwise 'cpu'."""
    import torch
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else "cpu"


def git_commit() -> str:
    """The checkout's short commit hash; DSV4_COMMIT overrides it, 'nogit' when neither is known."""
    if os.environ.get("DSV4_COMMIT"):
        return os.environ["DSV4_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "nogit"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "nogit"


def prefix(device: str | None = None, date: str | None = None) -> str:
    """'<date>_<device>_<commit>' for a run on `device` (see current_device) today."""
    date = date or datetime.date.today().isoformat()
    return f"{date}_{device_short_name(current_device(device))}_{git_commit()}"


def result_path(what: str, ext: str = "json", device: str | None = None, folder: str | None = None) -> str:
    """<folder>/<date>_<device>_<commit>_<what>.<ext>; folder: DSV4_RESULTS_DIR or bench/results (created)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", what):
        raise ValueError(f"what={what!r}: use letters, digits, '_', '-' or '.' (it becomes part of a file name)")
    folder = folder or os.environ.get("DSV4_RESULTS_DIR") or RESULTS_DIR
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{prefix(device)}_{what}.{ext}")


def record(device: str | None = None) -> dict[str, str]:
    """The provenance fields a result file carries: date, device (full name), commit."""
    return {"date": datetime.date.today().isoformat(), "device": current_device(device), "commit": git_commit()}


if __name__ == "__main__":
    args = sys.argv[1:]
    print(result_path(*args[:2]) if args else prefix())
