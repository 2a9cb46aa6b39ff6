"""What each V4 training ingredient buys: the `small` preset on one GPU, a fixed token budget per setting.

    python bench/train_ablations.py --out runs/ablations --steps 150 --batch-size 16 --seq-len 512

Settings (each swaps one ingredient of the V4 recipe for its usual baseline): v4 (Muon, mHC, CSA/HCA,
MTP), adamw, dense attention, plain residual, unconstrained hyper-connections, FP4 QAT, no MTP. Each run
lands in OUT/<setting>/; the summary goes to bench/results/<date>_<device>_<commit>_ablations.json (unless
--json names another file) and OUT/summary.json, the curves to OUT/compare.png, and a table is printed
(validation loss, tokens/s, peak memory, mHC gain).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

from provenance import record, result_path  # bench/provenance.py

SETTINGS = {
    "v4": {},
    "adamw": {"optimizer": "adamw"},
    "dense-attention": {"attention": "dense"},
    "plain-residual": {"residual": "none"},
    "unconstrained-hc": {"residual": "hc"},
    "qat-fp4": {"qat": "fp4"},
    "no-mtp": {"mtp": 0},
}


def tokens_to_reach(rows: list[dict], target: float) -> float | None:
    """Tokens at which a run's validation loss first reaches `target` (linear interpolation)."""
    pts = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1) if l0 != l1 else t1
    return None


def _launch(name: str, a, common: list[str], procs: dict, tok: str) -> None:
    out = os.path.join(a.out, name)
    extra = [x for k, v in SETTINGS[name].items() for x in ("--" + k.replace("_", "-"), str(v))]
    if name != "v4" and os.path.isfile(tok):
        extra += ["--tokenizer", os.path.dirname(tok)]  # every setting sees the same tokens
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // max(a.parallel, 1))))
    log = open(os.path.join(a.out, f"{name}.log"), "w")
    procs[name] = (subprocess.Popen([sys.executable, "-m", "dsv4", "train", *common, *extra, "--out", out],
                                    stdout=log, stderr=subprocess.STDOUT, env=env), time.time())


def _wait(procs: dict, a, keep: int) -> None:
    """Wait until at most `keep` runs are still going."""
    while len(procs) > keep:
        for name, (p, t0) in list(procs.items()):
            if p.poll() is not None:
                print(f"{name}: exit {p.returncode} in {time.time() - t0:.0f} s", flush=True)
                if p.returncode:
                    with open(os.path.join(a.out, f"{name}.log")) as f:
                        print(f.read()[-1500:], flush=True)
                del procs[name]
        time.sleep(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/ablations", help="the runs' folder")
    p.add_argument("--json", help="summary file (default: bench/results/<date>_<device>_<commit>_ablations.json)")
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--corpus-bytes", type=int, default=12_000_000)
    p.add_argument("--only", nargs="*", help="a subset of the settings")
    p.add_argument("--parallel", type=int, default=1, help="settings trained at once on the GPU (tok/s then shared)")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    common = ["--preset", a.preset, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
              "--seq-len", str(a.seq_len), "--lr", str(a.lr), "--max-corpus-bytes", str(a.corpus_bytes),
              "--eval-interval", str(max(a.steps // 6, 1)), "--eval-batches", "16", "--save-interval",
              str(a.steps), "--log-interval", "5", "--warmup", str(max(a.steps // 10, 1)), "--sample-tokens", "0",
              "--data-cache", os.path.join(a.out, "data_cache")]
    procs: dict[str, tuple[subprocess.Popen, float]] = {}
    pending = [n for n in SETTINGS if not a.only or n in a.only]
    tok = os.path.join(a.out, "v4", "tokenizer", "tokenizer.json")
    if "v4" in pending and not os.path.isfile(tok):  # the first run trains the tokenizer every setting shares
        _launch("v4", a, common, procs, tok)
        _wait(procs, a, 0)
        pending.remove("v4")
    for name in pending:
        _launch(name, a, common, procs, tok)
        _wait(procs, a, a.parallel - 1)
    _wait(procs, a, 0)
    runs = {}
    for name in SETTINGS:
        path = os.path.join(a.out, name, "metrics.jsonl")
        if os.path.isfile(os.path.join(a.out, name, "result.json")):
            with open(path) as f:
                runs[name] = [json.loads(line) for line in f]
    from dsv4.cli.compare import summarize
    from dsv4.train.plots import plot_losses
    table = [summarize(os.path.join(a.out, n))[0] for n in runs]
    plot_losses(runs, os.path.join(a.out, "compare.png"))
    summary = {**record(), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else
               platform.processor(), "torch": torch.__version__, "settings": SETTINGS, "args": vars(a), "table": table,
               "note": "tok/s of runs trained concurrently share one GPU" if a.parallel > 1 else ""}
    if "v4" in runs and "adamw" in runs:
        target = table[[t["run"] for t in table].index("adamw")]["val_loss"]
        need = tokens_to_reach(runs["v4"], target)
        summary["muon_tokens_to_adamw_final"] = need
        summary["muon_token_saving"] = None if need is None else 1 - need / runs["adamw"][-1]["tokens"]
    result = a.json or result_path("ablations")
    for path in (result, os.path.join(a.out, "summary.json")):
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
    print(f"summary: {result}")
    print(f"{'setting':<20}{'val loss':>10}{'train loss':>12}{'tok/s':>10}{'peak GB':>9}{'mHC gain':>10}")
    for t in table:
        print(f"{t['run']:<20}{t['val_loss']:>10.3f}{t['train_loss']:>12.3f}{t['tok_per_s']:>10,.0f}"
              f"{(t['peak_mem_gb'] or 0):>9.1f}{(t['mhc_gain'] or 1):>10.3f}")
    if "muon_token_saving" in summary:
        print(f"Muon reaches AdamW's final validation loss after {summary['muon_tokens_to_adamw_final']} tokens "
              f"(saving {summary['muon_token_saving']})")


if __name__ == "__main__":
    main()
